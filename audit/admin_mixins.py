"""`AuditedAdmin`: a ModelAdmin mixin that records every add, change and delete made in the admin,
with what changed (the object's editable fields before and after, its inlines' too).

Put it first: `class DeploymentAdmin(AuditedAdmin, admin.ModelAdmin)`. It hooks the points every
admin path goes through: the object as stored before a change is read when a POST fetches it
(`get_object`: the change form, the user's password form) or just before it is saved
(`save_model`: list_editable); it is compared with the stored object after the save, many-to-many
and inlines included (`log_addition` / `log_change`, which the admin calls last); deletions are
recorded as the admin logs them (`log_deletions`: the delete page and the delete action alike),
in the same transaction as the delete. Custom admin actions record for themselves.
"""

from audit import changes as diffing
from audit.services import Action, describe, record

BEFORE = "_audit_before"  # attribute of the object (and of an inline's) holding its stored fields
INLINES = "_audit_inlines"  # attribute of the object holding its inlines' changes


def _label(obj) -> str:
    return f"{obj._meta.verbose_name} “{obj}”"


class AuditedAdmin:
    # The actions its entries carry; None records nothing (the admin records the action itself).
    audit_added_action: str | None = Action.ADMIN_ADDED
    audit_changed_action: str | None = Action.ADMIN_CHANGED
    audit_deleted_action: str | None = Action.ADMIN_DELETED
    # A deletion's entry lists the fields the object held; False: only what it was (for rows of
    # users' content, such as prompts, which a deletion means to remove).
    audit_deleted_values = True

    def audit_action_for_change(self, obj, changes: dict) -> str | None:
        """The action of a change (ApiTokenAdmin: a revocation is `token_revoked`)."""
        return self.audit_changed_action

    # --- before -------------------------------------------------------------------------------

    def get_object(self, request, object_id, from_field=None):
        obj = super().get_object(request, object_id, from_field)
        if obj is not None and request.method == "POST":
            setattr(obj, BEFORE, diffing.snapshot(obj))
        return obj

    def save_model(self, request, obj, form, change):
        if change and not hasattr(obj, BEFORE):
            setattr(obj, BEFORE, diffing.snapshot(diffing.fresh(obj)))
        super().save_model(request, obj, form, change)

    def save_formset(self, request, form, formset, change):
        for inline_form in formset.forms:
            inline = inline_form.instance
            if inline.pk is not None and inline_form.has_changed():
                setattr(inline, BEFORE, diffing.snapshot(diffing.fresh(inline)))
        super().save_formset(request, form, formset, change)
        found = getattr(form.instance, INLINES, {})
        for inline in formset.new_objects:
            found.update({f"{_label(inline)}: {k}": v for k, v in diffing.diff({}, diffing.snapshot(inline)).items()})
        for inline, _ in formset.changed_objects:
            after = diffing.snapshot(diffing.fresh(inline))
            found.update({f"{_label(inline)}: {k}": v for k, v in diffing.diff(getattr(inline, BEFORE, {}), after).items()})
        for inline in formset.deleted_objects:
            found[_label(inline)] = "deleted"
        setattr(form.instance, INLINES, found)

    # --- after --------------------------------------------------------------------------------

    def _changes(self, obj, before: dict) -> dict:
        changes = diffing.diff(before, diffing.snapshot(diffing.fresh(obj) or obj))
        changes.update(getattr(obj, INLINES, {}))
        return changes

    def log_addition(self, request, obj, message):
        entry = super().log_addition(request, obj, message)
        if self.audit_added_action:
            record(action=self.audit_added_action, request=request, obj=obj, changes=self._changes(obj, {}))
        return entry

    def log_change(self, request, obj, message):
        entry = super().log_change(request, obj, message)
        changes = self._changes(obj, getattr(obj, BEFORE, {}))
        action = self.audit_action_for_change(obj, changes)
        if action and changes:
            record(action=action, request=request, obj=obj, changes=changes)
        return entry

    def log_deletions(self, request, queryset):
        entries = super().log_deletions(request, queryset)
        if self.audit_deleted_action:
            for obj in queryset:
                record(
                    action=self.audit_deleted_action,
                    request=request,
                    obj=describe(obj),
                    changes=diffing.diff(diffing.snapshot(obj), {}) if self.audit_deleted_values else {},
                )
        return entries
