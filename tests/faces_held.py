"""faces-dnn whose identities stage can be held at a known point, loaded by workers as `tests.faces_held:HELD_FACES`
(TILEREC_PLUGIN_MODULES): a test kills the process that holds it, mid-embedding."""

from pipeline.recognizers.faces import FaceIdentities
from tests.held_stage import held

HELD_FACES = held("faces-dnn", FaceIdentities)
