"""Per-user token budgets (prompt plus answer tokens) per UTC calendar day and calendar month.

Limits, field by field: the user's own `chat.Quota` row; where that is blank (or missing), the
`Quota` rows of the user's groups, the most generous of them (0, no limit, beats any number);
where those are blank too, the site's QUOTA_TOKENS_PER_DAY / QUOTA_TOKENS_PER_MONTH. 0 means no
limit at every level. A group's limit is each member's own budget, not a pool they share.

Usage is read from the daily rollup (`chat.models.DailyUsage`), which chat/lifecycle.py adds each
request to in the transaction that ends it: exact across web processes and workers, and kept in
PostgreSQL across restarts. A request counts once it has ended (one that is running when the budget
runs out finishes), on the UTC day it was queued; errors and cancelled answers count the tokens
they used. `services.prepare` calls `check` for every API and the chat page: one query for the
limits and, where one is set, one aggregate over the user's rows of this month (index
chat_dailyusage_user_day).
"""

import datetime
import math
from dataclasses import dataclass

from django.conf import settings
from django.db.models import F, Q, Sum
from django.utils import timezone

from chat.models import DailyUsage, Quota
from llmsite.errors import QuotaExceeded


@dataclass(frozen=True)
class Budget:
    name: str  # "daily" or "monthly"
    used: int
    limit: int  # 0: no limit
    resets_at: datetime.datetime

    @property
    def exceeded(self) -> bool:
        return self.limit > 0 and self.used >= self.limit


def _pick(own: int | None, groups: list, default: int) -> int:
    """The user's own limit, else the most generous of their groups' (0 beats all), else the site's."""
    if own is not None:
        return own
    values = [value for value in groups if value is not None]
    if not values:
        return default
    return 0 if 0 in values else max(values)


def limits_for(user) -> tuple[int, int]:
    """(tokens per day, tokens per month) for `user`; 0 means no limit."""
    rows = list(
        Quota.objects.filter(Q(user_id=user.pk) | Q(group__user=user.pk)).values_list("user_id", "tokens_per_day", "tokens_per_month")
    )
    own = next((row for row in rows if row[0] is not None), (None, None, None))
    groups = [row for row in rows if row[0] is None]
    return (
        _pick(own[1], [row[1] for row in groups], settings.QUOTA_TOKENS_PER_DAY),
        _pick(own[2], [row[2] for row in groups], settings.QUOTA_TOKENS_PER_MONTH),
    )


def resets(now: datetime.datetime) -> tuple[datetime.datetime, datetime.datetime]:
    """When the UTC day and the UTC month of `now` end (the next midnight, the next 1st)."""
    today = now.astimezone(datetime.UTC).date()
    next_month = (today.replace(day=1) + datetime.timedelta(days=32)).replace(day=1)

    def midnight(day):
        return datetime.datetime.combine(day, datetime.time.min, tzinfo=datetime.UTC)

    return midnight(today + datetime.timedelta(days=1)), midnight(next_month)


def usage_of(user, now: datetime.datetime) -> tuple[int, int]:
    """The tokens of the user's ended requests queued today and this month (UTC): one query."""
    today = now.astimezone(datetime.UTC).date()
    tokens = F("prompt_tokens") + F("completion_tokens")
    totals = DailyUsage.objects.filter(user_id=user.pk, day__gte=today.replace(day=1)).aggregate(
        today=Sum(tokens, filter=Q(day=today)), month=Sum(tokens)
    )
    return int(totals["today"] or 0), int(totals["month"] or 0)


def budgets(user, now: datetime.datetime | None = None, *, limits: tuple[int, int] | None = None) -> list[Budget]:
    """The user's daily and monthly budgets with what is used of them, in that order."""
    now = now or timezone.now()
    per_day, per_month = limits or limits_for(user)
    used_today, used_month = usage_of(user, now)
    day_reset, month_reset = resets(now)
    return [Budget("daily", used_today, per_day, day_reset), Budget("monthly", used_month, per_month, month_reset)]


def _in(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    days, hours, minutes = minutes // 1440, minutes // 60 % 24, minutes % 60
    parts = [f"{days} d"] * bool(days) + [f"{hours} h"] * bool(hours) + [f"{minutes} min"] * bool(minutes or not (days or hours))
    return " ".join(parts)


def message(budget: Budget, now: datetime.datetime) -> str:
    period = "today" if budget.name == "daily" else "this month"
    return (
        f"Your {budget.name} token budget is used up: {budget.used:,} of {budget.limit:,} tokens {period} (UTC). "
        f"It resets at {budget.resets_at:%Y-%m-%d %H:%M} UTC (in {_in((budget.resets_at - now).total_seconds())})."
    )


def check(*, user, now: datetime.datetime | None = None) -> None:
    """Raise QuotaExceeded (429, `Retry-After` until the reset) once a budget of `user` is used up."""
    if user is None:
        return
    limits = limits_for(user)
    if not any(limits):
        return  # no limit: no usage query
    now = now or timezone.now()
    exceeded = [budget for budget in budgets(user, now, limits=limits) if budget.exceeded]
    if exceeded:
        budget = exceeded[-1]  # both used up: the monthly one, which resets later
        raise QuotaExceeded(message(budget, now), retry_after=math.ceil((budget.resets_at - now).total_seconds()))


def summary(user) -> dict:
    """What the chat page shows: {"daily": {used, limit}, "monthly": {...}, "text": "Today: 1,234 / 50,000 tokens · ..."}."""
    found = budgets(user)
    labels = {"daily": "Today", "monthly": "This month"}
    texts = [
        f"{labels[b.name]}: {b.used:,} / {b.limit:,} tokens" if b.limit else f"{labels[b.name]}: {b.used:,} tokens" for b in found
    ]
    result = {b.name: {"used": b.used, "limit": b.limit, "resets_at": b.resets_at.isoformat()} for b in found}
    return {**result, "text": " · ".join(texts)}
