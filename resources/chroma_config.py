import warnings

from dagster import ConfigurableResource, InitResourceContext

from chroma_pipeline.config import ChromaConfig, load_config
from chroma_pipeline.models import check_model_source


class ChromaConfigResource(ConfigurableResource):
    """The training config file: the same JSON drives the CLI, the UI and schedules.

    It is read and validated when a run starts, so a bad value fails the run before
    any asset loads a model.
    """

    config_path: str

    def setup_for_execution(self, context: InitResourceContext) -> None:
        # The config's notes are logged by the step that reads it (`load(context.log)`), not here too.
        check_model_source(self.load())

    def load(self, log=None) -> ChromaConfig:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = load_config(self.config_path)
        for warning in caught:
            if log is not None:
                log.warning(str(warning.message))
        return config
