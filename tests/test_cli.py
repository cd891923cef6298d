"""The command line parses; `bench` refuses to run without a GPU instead of timing the CPU."""

import pytest
import torch

from mxpass.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("argv", [["bench"], ["bench", "linear"], ["bench", "model", "linear"]])
def test_bench_without_gpu_says_so(argv):
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(argv)


def test_unknown_scheme_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--scheme", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
