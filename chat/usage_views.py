"""The admin's usage dashboard (`/admin/usage/`) and its CSV (`/admin/usage/csv`).

Staff only (llmsite/urls.py wraps both in the admin's own login check), and only those who may
view the stored requests: the dashboard shows every user's usage.
"""

import csv
import datetime
from functools import wraps

from django import forms
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.http import HttpResponse
from django.template.response import TemplateResponse

from chat import usage, usage_charts
from chat.models import Deployment
from llmsite.pages import CONTENT_SECURITY_POLICY

DEFAULT_DAYS = 30
# The per-day table, on the page and in the CSV: the same cells under two sets of names.
DAILY_COLUMNS = [
    "Day (UTC)", "Deployment", "Requests", "ok", "error", "cancelled", "Prompt tokens", "Completion tokens",
    "Cached tokens", "Tokens", "TTFT p50 (ms)", "TTFT p99 (ms)",
]
CSV_COLUMNS = [
    "day", "deployment", "requests", "ok", "error", "cancelled", "prompt_tokens", "completion_tokens",
    "cached_tokens", "tokens", "ttft_p50_ms", "ttft_p99_ms",
]


def daily_cells(report: usage.Usage) -> list[list]:
    """A row per day and deployment with requests; no time to the first token is None."""
    cells = []
    for row in report.daily_rows():
        c, ttft = row["counts"], row["ttft"]
        cells.append([
            row["day"].isoformat(), row["deployment"], c.requests, c.ok, c.error, c.cancelled,
            c.prompt_tokens, c.completion_tokens, c.cached_tokens, c.tokens,
            ttft.p50_ms if ttft else None, ttft.p99_ms if ttft else None,
        ])
    return cells


class UsageForm(forms.Form):
    start = forms.DateField(required=False, label="From (UTC day)", widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(required=False, label="To (UTC day)", widget=forms.DateInput(attrs={"type": "date"}))
    deployment = forms.ModelChoiceField(
        Deployment.objects.all(), required=False, to_field_name="name", empty_label="All deployments"
    )
    user = forms.CharField(required=False, label="User", help_text="A username; empty: everyone.")

    def clean(self):
        data = super().clean()
        data["end"] = data.get("end") or datetime.datetime.now(datetime.UTC).date()
        data["start"] = data.get("start") or data["end"] - datetime.timedelta(days=DEFAULT_DAYS - 1)
        if data["start"] > data["end"]:
            raise forms.ValidationError("The range ends before it starts.")
        if (data["end"] - data["start"]).days >= usage.MAX_DAYS:
            raise forms.ValidationError(f"Choose at most {usage.MAX_DAYS} days.")
        if data.get("user"):
            found = get_user_model().objects.filter(username=data["user"]).values_list("pk", flat=True).first()
            if found is None:
                self.add_error("user", "No user has that name.")
            data["user_id"] = found
        return data

    def filters(self) -> usage.Filters:
        data = self.cleaned_data
        deployment = data.get("deployment")
        return usage.Filters(data["start"], data["end"], deployment.pk if deployment else None, data.get("user_id"))


def usage_page(view):
    """Only for those who may view the stored requests; served with the site's content security
    policy (the charts carry no script)."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not request.user.has_perm("chat.view_requestlog"):
            raise PermissionDenied
        response = view(request, *args, **kwargs)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response

    return wrapper


@usage_page
def dashboard(request):
    form = UsageForm(request.GET)
    context = {**admin.site.each_context(request), "title": "Usage", "form": form, "report": None}
    if form.is_valid():
        filters = form.filters()
        form.data = form.data.copy()  # the form shows the days it defaulted to, the CSV link names them
        form.data["start"], form.data["end"] = filters.start.isoformat(), filters.end.isoformat()
        report = usage.usage(filters)
        context.update(
            report=report,
            totals=report.totals,
            charts=usage_charts.charts(report),
            daily_table=usage_charts.table_html(DAILY_COLUMNS, daily_cells(report), labels=2, table_id="usage-daily"),
            exact_days=usage.EXACT_DAYS,
            csv_query=form.data.urlencode(),
        )
    return TemplateResponse(request, "admin/usage.html", context, status=200 if form.is_valid() else 400)


def csv_cell(value):
    """A cell a spreadsheet shows as text, never runs as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


@usage_page
def usage_csv(request):
    """The dashboard's table (a row per day and deployment), with the same filters."""
    form = UsageForm(request.GET)
    if not form.is_valid():
        return HttpResponse(form.errors.as_text(), status=400, content_type="text/plain; charset=utf-8")
    filters = form.filters()
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="usage-{filters.start}-{filters.end}.csv"'
    writer = csv.writer(response)
    writer.writerow(CSV_COLUMNS)
    for day, deployment, *numbers in daily_cells(usage.usage(filters)):
        writer.writerow([day, csv_cell(deployment), *("" if n is None else n for n in numbers)])
    return response
