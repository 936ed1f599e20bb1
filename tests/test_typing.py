"""The type hints are part of the code: mypy (with the zope plugin) must accept them."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

from tests.support import ROOT


class MypyTests(TestCase):
    def test_hookah_type_checks(self) -> None:
        try:
            import mypy  # noqa: F401
        except ImportError:
            self.fail("mypy is not installed (pip install '.[test]'): the type check cannot run")
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "mypy.ini")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("Success", result.stdout)
