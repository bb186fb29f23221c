"""The tags Dagster writes on asset events to record versions and lineage, named once.

Dagster exports no constants for these names (its own sit in a private module), yet they
are what it stores and shows: the UI and GraphQL read them, and the REST API's
`report_asset_observation` turns its `data_version` field into the first one. Reading an
observation's version has a public property (`AssetObservation.data_version`); writing one
from a sensor, and reading what a materialization recorded, has only these strings.
"""

from __future__ import annotations

from dagster import AssetKey

DATA_VERSION_TAG = "dagster/data_version"  # on every materialization and versioned observation
CODE_VERSION_TAG = "dagster/code_version"  # on a materialization: the asset's code version when it ran
_INPUT_DATA_VERSION_PREFIX = "dagster/input_data_version/"  # + a parent's user string: its version read then


def input_data_version_tag(parent: AssetKey) -> str:
    """The tag under which a materialization records the data version it read of `parent`."""
    return _INPUT_DATA_VERSION_PREFIX + parent.to_user_string()
