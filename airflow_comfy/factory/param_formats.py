"""The JSON-schema format of image params, so that Airflow refuses a bad input image when a run is triggered
with a sentence ("'../secret.png' leaves the input folder") instead of a regular expression.

Airflow validates a run's params with ``jsonschema`` and ``FormatChecker()`` (the REST API and the trigger form
in the api-server, ``Param.resolve`` in the task), and answers with the validation error's text, whose first
line is the message of the failing keyword. A ``pattern`` can only say "does not match '<regex>'"; a format
checker that raises ``FormatError`` itself chooses the message. Formats are registered on ``FormatChecker``'s
class-level table, which every new ``FormatChecker()`` copies: :func:`register_param_formats` runs when this
provider's Airflow plugin is imported (every Airflow process loads plugins) and when the DAGs are built.
An Airflow process without the plugin skips the unknown format (``jsonschema`` ignores formats it does not
know), and the runner refuses the same value, with the same sentence, before its first node runs.

The rules themselves are :func:`airflow_comfy.workflow.inputs.input_image_problem`; the input folder and input
store are this process's ``[comfy] input_path`` and ``input_store``.
"""

from __future__ import annotations

from jsonschema import FormatChecker
from jsonschema.exceptions import FormatError

from airflow_comfy.config import get_settings
from airflow_comfy.workflow.inputs import INPUT_IMAGE_FORMAT, input_image_problem


def register_param_formats() -> None:
    """Teach ``jsonschema`` (hence Airflow's param validation) the format of image params."""
    FormatChecker.checkers[INPUT_IMAGE_FORMAT] = (check_input_image, ())


def check_input_image(value: object) -> bool:
    """True for an input image the runner will read; otherwise ``FormatError`` with the sentence why not.
    Values of another type pass here: the schema's ``type`` reports them."""
    if not isinstance(value, str):
        return True
    problem = input_image_problem(value, get_settings().input_roots)
    if problem:
        raise FormatError(problem)
    return True
