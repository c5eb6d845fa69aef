"""Numbers as the usage dashboard shows them: thousands separated, times to a tenth of a ms."""

from django import template

register = template.Library()


@register.filter
def usage_number(value):
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return value
