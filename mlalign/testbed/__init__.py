"""The offline testbed: a tiny 26-layer Gemma-2 with its tokenizer and per-layer SAEs, built from the bundled corpus."""

from mlalign.testbed.build import BUILD_VERSION, TestbedSpec, build_testbed, ensure_testbed, testbed_dir

__all__ = ["BUILD_VERSION", "TestbedSpec", "build_testbed", "ensure_testbed", "testbed_dir"]
