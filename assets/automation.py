"""When the automation sensor re-materializes an asset: when Dagster itself calls it unsynced.

Dagster's `eager()` reacts to *events* (a parent was re-materialized), which misses three
things our users hit: a forced re-run with an unchanged data version is not a change, a
change noticed while a run was failing or in flight must not be forgotten, and edits made
before the sensor first ran must still be acted on. So the condition asks the question the
UI answers ("is this asset unsynced or missing?") on every tick.

Dagster has no public API for that answer (dagster-io/dagster#19368), so `Unsynced` reads
the same facts from the instance's public records: what the latest materialization
recorded (its code version, each parent's data version) against what holds now.
`tests/test_staleness.py` pins it to the status Dagster's GraphQL API (the UI) reports.
"""

from __future__ import annotations

from dagster import AssetKey, AutomationCondition, AutomationContext, AutomationResult, DagsterInstance

from ._dagster_tags import CODE_VERSION_TAG, DATA_VERSION_TAG, input_data_version_tag


def current_data_version(instance: DagsterInstance, asset_graph, key: AssetKey) -> str | None:
    """The data version `key` has now: its latest observation's if Dagster observes it, else its latest materialization's."""
    if asset_graph.get(key).is_observable:
        records = instance.fetch_observations(key, limit=1).records
        return records[0].asset_observation.data_version if records else None
    records = instance.fetch_materializations(key, limit=1).records
    return records[0].asset_materialization.tags.get(DATA_VERSION_TAG) if records else None


def unsynced_or_missing(instance: DagsterInstance, asset_graph, key: AssetKey) -> bool:
    """Missing; or its code version, or a parent's data version, differs from what its latest materialization recorded.

    A parent with no data version yet (a folder never observed) counts as unchanged, as in
    Dagster; a materializable parent that is missing is left to `any_deps_missing`.
    Dagster's staleness is one level deep: a stale parent does not make its children stale.
    """
    records = instance.fetch_materializations(key, limit=1).records
    if not records:
        return True
    recorded = records[0].asset_materialization.tags
    node = asset_graph.get(key)
    if node.code_version and node.code_version != recorded.get(CODE_VERSION_TAG):
        return True
    for parent in node.parent_keys:
        now = current_data_version(instance, asset_graph, parent)
        if now is not None and now != recorded.get(input_data_version_tag(parent)):
            return True
    return False


class Unsynced(AutomationCondition):
    """True when the asset is unsynced (a parent's new data version, a new code version) or missing."""

    @property
    def name(self) -> str:
        return "unsynced_or_missing"

    def evaluate(self, context: AutomationContext) -> AutomationResult:
        # The graph has no partitions: the asset as a whole is either unsynced or not.
        unsynced = unsynced_or_missing(context.asset_graph_view.instance, context.asset_graph, context.key)
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
