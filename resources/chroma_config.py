import json
import warnings

from dagster import ConfigurableResource, InitResourceContext

from chroma_pipeline.config import ChromaConfig, ConfigError, changed_settings, load_config, settings_snapshot
from chroma_pipeline.models import check_model_source


class ChromaConfigResource(ConfigurableResource):
    """The training config file: the same JSON drives the CLI, the UI and schedules.

    It is read and validated when a run starts, so a bad value fails the run before
    any asset loads a model. `loaded_settings` holds the settings the code location was
    built from (its code versions say which results are unsynced); a run whose file now
    says otherwise is refused before any work, since it would record results under code
    versions that do not describe them. Empty where no code location is involved.
    """

    config_path: str
    loaded_settings: str = ""

    def setup_for_execution(self, context: InitResourceContext) -> None:
        # Resources are set up once per run (one process: in_process_executor), so the config's notes
        # go to the run's log here, once, and the steps load it without logging them again.
        config = self.load(context.log if context.dagster_run is not None else None)
        changes = self.changes_since_load(config) if context.dagster_run is not None else {}  # sensors just report it
        if changes:
            raise ConfigError(stale_code_location_advice(self.config_path, changes))
        check_model_source(config)

    def load(self, log=None) -> ChromaConfig:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = load_config(self.config_path)
        for warning in caught:
            if log is not None:
                log.warning(str(warning.message))
        return config

    def changes_since_load(self, config: ChromaConfig | None = None) -> dict[str, str]:
        """Setting -> "loaded → now" for what the file changed since the code location loaded it."""
        if not self.loaded_settings:
            return {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown keys are the step's to report
            now = settings_snapshot(config or load_config(self.config_path), tuple(json.loads(self.loaded_settings)))
        return changed_settings(self.loaded_settings, now)


def stale_code_location_advice(config_path: str, changes: dict[str, str]) -> str:
    listed = "; ".join(f"{name}: {change}" for name, change in list(changes.items())[:5])
    more = f" and {len(changes) - 5} more" if len(changes) > 5 else ""
    return (
        f"{config_path} changed since the code location loaded it ({listed}{more}). Reload the code location "
        "(Deployment > Reload, or restart dagster dev) so Dagster's code versions describe the settings you run "
        "with; this run was refused before doing any work."
    )
