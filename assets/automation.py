"""When the automation sensor re-materializes an asset: when Dagster itself calls it unsynced.

Dagster's `eager()` reacts to *events* (a parent was re-materialized), which misses three
things our users hit: a forced re-run with an unchanged data version is not a change, a
change noticed while a run was failing or in flight must not be forgotten, and edits made
before the sensor first ran must still be acted on. So the condition asks the question the
UI answers ("is this asset unsynced or missing?") on every tick.
"""

from __future__ import annotations

from dagster import AutomationCondition, AutomationContext, AutomationResult
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus


class Unsynced(AutomationCondition):
    """True when Dagster reports the asset stale (new parent data version, new code version) or missing."""

    @property
    def name(self) -> str:
        return "unsynced_or_missing"

    def evaluate(self, context: AutomationContext) -> AutomationResult:
        view = context.asset_graph_view  # it doubles as the loading context the resolver needs
        resolver = CachingStaleStatusResolver(view.instance, context.asset_graph, view)
        unsynced = resolver.get_status(context.key) in (StaleStatus.STALE, StaleStatus.MISSING)
        return AutomationResult(context, context.candidate_subset if unsynced else context.get_empty_subset())


def no_failed_blocking_check_upstream() -> AutomationCondition:
    """No parent's blocking check failed on its latest materialization, unless the parent runs again now.

    Dagster's own `all_deps_blocking_checks_passed` waits for a *passed* result: it would
    wait forever on materializations made before a check existed, and it needs the check
    itself requested, while our checks ride along with their asset (so a caption edit is
    one run, not two). A recorded failure is what must stop training.
    """
    no_failed = ~AutomationCondition.any_checks_match(AutomationCondition.check_failed(), blocking_only=True)
    return AutomationCondition.all_deps_match(
        no_failed | AutomationCondition.will_be_requested()
    ).with_label("no failed blocking check upstream (or the parent runs again now)")


def on_unsynced() -> AutomationCondition:
    """Request an asset when it is unsynced, or when a parent is requested on the same tick.

    After a failed run the asset is not retried on every tick (a broken setting would loop);
    it is retried once something changes: a parent's data version or its own code version.
    Parents requested on the same tick pull their children into the same run, so a caption
    edit becomes one run (embeddings, adapter, grid) instead of three. Nothing trains on a
    parent whose blocking check failed (NaN latents, a broken mask, a NaN base model).
    """
    changed_since_handled = (
        AutomationCondition.any_deps_match(AutomationCondition.data_version_changed())
        | AutomationCondition.code_version_changed()
    ).since_last_handled()
    retry_allowed = ~AutomationCondition.execution_failed() | changed_since_handled
    return (
        ((Unsynced() & retry_allowed) | AutomationCondition.any_deps_match(AutomationCondition.will_be_requested()))
        & ~AutomationCondition.any_deps_missing()
        & no_failed_blocking_check_upstream()
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
    ).with_label("unsynced (data versions, settings) or missing")
