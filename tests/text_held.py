"""The `text` recognizer whose second stage can be held at a known point, loaded by workers as
`tests.text_held:HELD_TEXT` (TILEREC_PLUGIN_MODULES): a test kills the process that holds it, mid-reading."""

from pipeline.recognizers.text_stage import TextStage
from tests.held_stage import held

HELD_TEXT = held("text", TextStage)
