"""Build step that pyproject.toml cannot express: install ``hh_peft_autoload.pth`` at the top of site-packages.

The ``.pth`` holds one line, ``import _hh_peft_autoload``, which ``site`` runs at interpreter start-up; that module
arranges for ``import hh_peft`` to run right after ``peft`` is imported (see its docstring). Everything else about
the distribution is declared in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

AUTOLOAD_PTH = "hh_peft_autoload.pth"
AUTOLOAD_LINE = "import _hh_peft_autoload\n"


class build_py_with_autoload_pth(build_py):
    """``build_py`` that also writes the ``.pth`` beside the top-level modules.

    A regular wheel is assembled from ``build_lib``. An editable install (PEP 660) keeps the sources in place and
    assembles its wheel from the ``install`` command's ``install_lib`` instead, so the file is written there.
    """

    def run(self):
        super().run()
        self.mkpath(self._pth_dir())
        with open(self._pth_path(), "w", encoding="utf-8") as file:
            file.write(AUTOLOAD_LINE)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, self._pth_path()]

    def _pth_dir(self) -> str:
        return self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib

    def _pth_path(self) -> str:
        return str(Path(self._pth_dir(), AUTOLOAD_PTH))


setup(cmdclass={"build_py": build_py_with_autoload_pth})
