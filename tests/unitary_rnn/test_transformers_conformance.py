"""transformers' own conformance suite (``ConfigTester``, ``ModelTesterMixin``) run against the unitary RNN.

The suite is the ``tests/`` folder of the transformers source distribution of the installed version,
fetched by ``python scripts/fetch_conformance_suites.py`` into ``.cache/suites/`` (never committed).
At collection time this module copies the two common files into a temporary package (not named
``tests``: the files use relative imports) and adds small stand-ins for the folders the sdist does not
ship (DESIGN.md section 5):

- ``exporters/test_export.py``: ``ExportTesterMixin`` as an empty class (no export tests);
- ``generation/test_utils.py``: ``GenerationTesterMixin`` as an empty class (these models do not generate);
- ``utils/test_configuration_utils.py``: ``config_common_kwargs``, the common config kwargs that
  ``ConfigTester.check_config_arguments_init`` sets and reads back.

The mixin picks label shapes and training cases from ``transformers.models.auto.modeling_auto.MODEL_*_MAPPING_NAMES``,
which ``Auto*.register`` does not fill; a module-scoped fixture adds ``unitary_rnn`` to the three
dicts for the duration of these tests and removes it afterwards.

Flags turned off (each with its reason) are the class attributes ``test_*`` / ``has_attentions`` below
and the overridden ``test_*`` methods at the end of the class.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
import unittest
from pathlib import Path

import pytest

from unitary_rnn import (
    UnitaryRNNConfig,
    UnitaryRNNForSequenceClassification,
    UnitaryRNNForTokenClassification,
    UnitaryRNNModel,
)

pytestmark = pytest.mark.conformance

ROOT = Path(__file__).resolve().parents[2]
TRANSFORMERS_VERSION = importlib.metadata.version("transformers")
SUITE = ROOT / ".cache" / "suites" / f"transformers-{TRANSFORMERS_VERSION}" / "tests"
COMMON_FILES = ("test_modeling_common.py", "test_configuration_common.py")

_missing = [name for name in COMMON_FILES if not (SUITE / name).is_file()]
if _missing:
    _message = (
        f"transformers {TRANSFORMERS_VERSION} conformance suite not found under {SUITE} "
        f"(missing {', '.join(_missing)}); run `.venv/bin/python scripts/fetch_conformance_suites.py`"
    )
    if os.environ.get("HH_REQUIRE_SUITES") == "1":
        pytest.fail(_message, pytrace=False)
    pytest.skip(_message, allow_module_level=True)

STANDINS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    # transformers' tests/utils/test_configuration_utils.py, as of transformers 5: the common kwargs
    # every config must accept and store
    "utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        "    'return_dict': False,\n"
        "    'output_hidden_states': True,\n"
        "    'output_attentions': True,\n"
        "    'dtype': 'float16',\n"
        "    'chunk_size_feed_forward': 5,\n"
        "    'architectures': ['BertModel'],\n"
        "    'id2label': {0: 'label'},\n"
        "    'label2id': {'label': '0'},\n"
        "    'problem_type': 'regression',\n"
        "}\n"
    ),
}


def _import_suite():
    """Copy the common files and the stand-ins into a fresh temporary package and import it."""
    tmp = Path(tempfile.mkdtemp(prefix="hf-suite-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    package = "transformers_suite_" + TRANSFORMERS_VERSION.replace(".", "_")
    pkg = tmp / package
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")  # must stay empty: test_configuration_common imports it as `transformers`
    for name in COMMON_FILES:
        shutil.copy(SUITE / name, pkg / name)
    for rel, text in STANDINS.items():
        target = pkg / rel
        target.parent.mkdir(exist_ok=True)
        (target.parent / "__init__.py").write_text("")
        target.write_text(text)
    sys.path.insert(0, str(tmp))
    try:
        modeling = importlib.import_module(f"{package}.test_modeling_common")
        configuration = importlib.import_module(f"{package}.test_configuration_common")
    finally:
        sys.path.remove(str(tmp))
    return modeling, configuration


_modeling_common, _configuration_common = _import_suite()
ModelTesterMixin = _modeling_common.ModelTesterMixin
ids_tensor = _modeling_common.ids_tensor
ConfigTester = _configuration_common.ConfigTester


@pytest.fixture(scope="module", autouse=True)
def _auto_mapping_names():
    from transformers.models.auto import modeling_auto

    names = {
        "MODEL_MAPPING_NAMES": "UnitaryRNNModel",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "UnitaryRNNForSequenceClassification",
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": "UnitaryRNNForTokenClassification",
    }
    for mapping, cls_name in names.items():
        getattr(modeling_auto, mapping)["unitary_rnn"] = cls_name
    yield
    for mapping in names:
        getattr(modeling_auto, mapping).pop("unitary_rnn", None)


class UnitaryRNNModelTester:
    """Builds a small config and inputs for the mixin (symbol inputs through a learned embedding)."""

    def __init__(self, parent, config_kwargs=None, batch_size=3, seq_length=7, vocab_size=11, input_size=16, hidden_size=8, num_labels=3):
        self.parent = parent
        self.config_kwargs = dict(config_kwargs or {})
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.input_size = input_size
        self.hidden_size_complex = hidden_size
        self.num_labels = num_labels
        self.num_hidden_layers = 1
        self.is_training = True
        # hidden_states[0] is the embedding output (batch, time, input_size): the mixin checks its last
        # dimension against `hidden_size`
        self.hidden_size = input_size

    def get_config(self) -> UnitaryRNNConfig:
        return UnitaryRNNConfig(
            vocab_size=self.vocab_size,
            input_embedding="embedding",
            input_size=self.input_size,
            hidden_size=self.hidden_size_complex,
            num_labels=self.num_labels,
            **self.config_kwargs,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        return self.get_config(), {"input_ids": input_ids}


class _UnitaryRNNConformance(ModelTesterMixin):
    all_model_classes = (UnitaryRNNModel, UnitaryRNNForSequenceClassification, UnitaryRNNForTokenClassification)
    config_kwargs: dict = {}

    # --- mixin flags turned off, with the reason ------------------------------------------------
    # no attention: an RNN has no attention maps to return
    has_attentions = False
    # the input map is a small nn.Embedding feeding a fixed-width input projection V (input_size);
    # resizing the vocabulary is meaningless for the symbol tasks (one-hot mode has no matrix at all)
    test_resize_embeddings = False
    # torch.export of a 1-step-per-iteration Python loop around a custom autograd Function is not a goal
    test_torch_exportable = False
    # every weight of ours is initialised in _init_weights: turn the init check on although the
    # config file carries no copyright year (the mixin skips models "added before 2023" otherwise)
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = UnitaryRNNModelTester(self, config_kwargs=self.config_kwargs)
        self.config_tester = ConfigTester(
            self, config_class=UnitaryRNNConfig, common_properties=["hidden_size", "num_hidden_layers"], hidden_size=8
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_auto_mapping_names_are_patched(self):
        """Without the fixture test_training and test_problem_types would silently test nothing."""
        from transformers.models.auto import get_values
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
            MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
        )

        self.assertIn("UnitaryRNNForSequenceClassification", get_values(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES))
        self.assertIn("UnitaryRNNForTokenClassification", get_values(MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES))


class UnitaryRNNFullConformanceTest(_UnitaryRNNConformance, unittest.TestCase):
    """Full-capacity complex uRNN (one complex64 N x N parameter)."""


class UnitaryRNNRestrictedConformanceTest(_UnitaryRNNConformance, unittest.TestCase):
    """Restricted-capacity uRNN (7N real parameters and a permutation buffer)."""

    config_kwargs = {"parametrization": "restricted"}


class UnitaryRNNRestrictedFFTConformanceTest(_UnitaryRNNConformance, unittest.TestCase):
    """Restricted-capacity uRNN applied with FFTs every step (the large-N path)."""

    config_kwargs = {"parametrization": "restricted", "restricted_apply": "fft"}


class OrthogonalRNNConformanceTest(_UnitaryRNNConformance, unittest.TestCase):
    """Real orthogonal RNN (field='real')."""

    config_kwargs = {"field": "real"}
