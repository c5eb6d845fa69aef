"""The usage dashboard's charts: pygal drawn to inline SVG on the server, each with the table of
the numbers it draws (for screen readers, tests and anyone who wants the figures).

pygal puts a <script> in every chart (its config, and its tooltips from a CDN unless js=[]); the
site loads no script from elsewhere and the dashboard's content security policy allows none
inline, so both are taken out of the SVG: the charts are plain drawings.
"""

from dataclasses import dataclass

import pygal
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe
from pygal.style import Style

from chat.templatetags.usage_format import usage_number
from chat.usage import OTHERS, TOP_USERS, Counts, Usage

BAR_DAYS = 62  # longer ranges draw stacked areas: a bar per day and series is slow to draw and heavy to send
STYLE = Style(
    background="white",
    plot_background="white",
    font_family="system-ui, sans-serif",
    colors=("#2f6db5", "#e08a1e", "#3b9c5a", "#c2413b", "#7a52a8", "#8c6d46", "#d16aa6", "#6f7f8c", "#b5b830", "#2bb0b8"),
)
OUTCOME_STYLE = Style(**(STYLE.to_dict() | {"colors": ("#3b9c5a", "#c2413b", "#8c8c8c")}))


@dataclass
class Chart:
    """One chart and its numbers: `columns` head the table, `rows` and `footer` fill it."""

    slug: str
    title: str
    svg: SafeString
    columns: list[str]
    rows: list[list]
    footer: list | None = None

    @property
    def table(self) -> SafeString:
        return table_html(self.columns, self.rows, self.footer, caption=f"{self.title}: the numbers")


def table_html(columns: list[str], rows: list[list], footer: list | None = None, *, labels: int = 1, caption: str = "", table_id: str = "") -> SafeString:
    """A table whose first `labels` cells in a row are text and the others numbers. Built here,
    not in a template loop: a year's table has thousands of cells, which Django's templates render
    a hundred times slower."""

    def row(cells, tag="td"):
        heads = format_html_join("", '<th scope="row">{}</th>', ((cell,) for cell in cells[:1]))
        texts = format_html_join("", "<td>{}</td>", ((cell,) for cell in cells[1:labels]))
        numbers = format_html_join("", '<td class="num">{}</td>', ((usage_number(cell),) for cell in cells[labels:]))
        return format_html("<tr>{}{}{}</tr>", heads, texts, numbers)

    head = format_html_join("", '<th scope="col"{}>{}</th>', ((mark_safe(' class="num"') if i >= labels else "", c) for i, c in enumerate(columns)))
    return format_html(
        '<table{}>{}<thead><tr>{}</tr></thead><tbody>{}</tbody>{}</table>',
        format_html(' id="{}"', table_id) if table_id else "",
        format_html('<caption class="visually-hidden">{}</caption>', caption) if caption else "",
        head,
        mark_safe("".join(row(cells) for cells in rows)),
        format_html("<tfoot>{}</tfoot>", row(footer)) if footer else "",
    )


def _plain(root):
    """Drop pygal's scripts, and the tooltips' texts only its script shows."""
    for parent in list(root.iter()):
        for child in list(parent):
            tag = child.tag if isinstance(child.tag, str) else ""
            if tag.endswith("script") or (tag.endswith("desc") and child.get("class") in ("value", "x", "y", "x_label", "y_label")):
                parent.remove(child)
    return root


def _svg(chart, title: str) -> SafeString:
    chart.add_xml_filter(_plain)

    def label(root):
        root.set("role", "img")
        root.set("aria-label", f"{title} (chart; its numbers are in the table beside it)")
        return root

    chart.add_xml_filter(label)
    return mark_safe(chart.render(is_unicode=True))


def _config(labels: list[str], **options) -> pygal.Config:
    config = pygal.Config(
        js=[],
        disable_xml_declaration=True,
        style=STYLE,
        width=760,
        height=340,
        legend_at_bottom=True,
        legend_at_bottom_columns=4,
        x_label_rotation=30,
        show_minor_x_labels=False,
        x_labels_major_every=max(1, len(labels) // 12),
        truncate_legend=40,
        no_data_text="No requests",
        value_formatter=lambda value: f"{value:,.0f}",
    )
    for name, value in options.items():
        setattr(config, name, value)
    return config


def _stacked(days) -> tuple:
    """Stacked bars, or over long ranges stacked areas: the chart kind and its options."""
    if len(days) <= BAR_DAYS:
        return pygal.StackedBar, {}
    return pygal.StackedLine, {"fill": True, "show_dots": False}


def _daily(slug: str, title: str, kind, days, series: dict[str, list], footer=None, **options) -> Chart:
    """A chart of values per day, one series each, and its table (a row per day)."""
    if kind is None:
        kind, stacked = _stacked(days)
        options = stacked | options
    labels = [day.isoformat() for day in days]
    chart = kind(_config(labels, **options))
    chart.x_labels = [label[5:] for label in labels]  # MM-DD: the years are in the table
    for name, values in series.items():
        chart.add(name, values)
    rows = [[label, *(values[i] for values in series.values())] for i, label in enumerate(labels)]
    if footer is None:
        footer = ["Total", *(sum(v or 0 for v in values) for values in series.values())]
    return Chart(slug, title, _svg(chart, title), ["Day (UTC)", *series], rows, footer)


def tokens_by_deployment(report: Usage) -> Chart:
    days = report.filters.days
    series = {
        report.deployment_names[d]: [report.by_day_deployment.get((day, d), Counts()).tokens for day in days]
        for d in report.deployments()
        if any((day, d) in report.by_day_deployment for day in days)
    }
    return _daily("tokens-by-deployment", "Tokens per day by deployment", None, days, series)


def tokens_by_user(report: Usage) -> Chart:
    """The busiest users' own series, everyone else in one."""
    days = report.filters.days
    series = {
        report.user_names[u]: [report.tokens_by_day_user.get((day, u), 0) for day in days]
        for u, _ in report.busiest_users(TOP_USERS)
    }
    others = [report.tokens_by_day_user.get((day, OTHERS), 0) for day in days]
    if any(others):
        series["other users"] = others
    return _daily("tokens-by-user", "Tokens per day by user", None, days, series)


def requests_by_outcome(report: Usage) -> Chart:
    by_day = report.by_day()
    days = report.filters.days
    series = {outcome: [getattr(by_day[day], outcome) for day in days] for outcome in ("ok", "error", "cancelled")}
    return _daily("requests-by-outcome", "Requests per day by outcome", None, days, series, style=OUTCOME_STYLE)


def time_to_first_token(report: Usage) -> Chart:
    """p50 and p99 per deployment per day (ms); the table's last row is the whole range."""
    days = report.filters.days
    series, footer = {}, ["Whole range"]
    for d in report.deployments():
        whole = report.ttft_by_deployment.get(d)
        if whole is None:
            continue
        name = report.deployment_names[d]
        for label, attribute in (("p50", "p50_ms"), ("p99", "p99_ms")):
            ttft = [report.ttft.get((day, d)) for day in days]
            series[f"{name} {label}"] = [getattr(t, attribute) if t else None for t in ttft]
            footer.append(getattr(whole, attribute))
    return _daily(
        "time-to-first-token", "Time to the first token, p50 and p99 per day (ms)", pygal.Line, days, series, footer,
        show_dots=len(days) <= BAR_DAYS, allow_interruptions=True, value_formatter=lambda value: f"{value:,.1f}",
    )


def _busiest(slug: str, title: str, named: list[tuple[str, Counts]]) -> Chart:
    chart = pygal.HorizontalBar(_config([], height=60 + 28 * max(1, len(named)), show_legend=False))
    chart.x_labels = [name for name, _ in reversed(named)]
    chart.add("tokens", [counts.tokens for _, counts in reversed(named)])
    rows = [[name, c.requests, c.prompt_tokens, c.completion_tokens, c.tokens] for name, c in named]
    columns = ["Name", "Requests", "Prompt tokens", "Completion tokens", "Tokens"]
    return Chart(slug, title, _svg(chart, title), columns, rows)


def busiest_users(report: Usage) -> Chart:
    named = [(report.user_names[u], c) for u, c in report.busiest_users()]
    return _busiest("busiest-users", "Busiest users (tokens)", named)


def busiest_tokens(report: Usage) -> Chart:
    named = [(report.token_names[t], c) for t, c in report.busiest_tokens()]
    return _busiest("busiest-tokens", "Busiest API tokens (tokens)", named)


def charts(report: Usage) -> list[Chart]:
    return [
        builder(report)
        for builder in (tokens_by_deployment, tokens_by_user, requests_by_outcome, time_to_first_token, busiest_users, busiest_tokens)
    ]
