import subprocess
import sys
import threading

import yaml

from reddino_train.cli import main
from reddino_train.config import shipped_configs


def test_no_command_prints_the_commands(capsys):
    assert main([]) == 0
    assert "{config,prepare,fit,export,eval}" in capsys.readouterr().out


def test_config_lists_and_resolves_recipes(capsys):
    assert main(["config"]) == 0
    assert capsys.readouterr().out.split() == shipped_configs()
    assert main(["config", "reddino-vitb14", "train.seed=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["arch"] == "vit_base_patch14_dinov2"
    assert printed["train"]["seed"] == 3


def test_config_error_exits_2_with_the_valid_keys(capsys):
    assert main(["config", "tiny", "crops.size=3"]) == 2
    error = capsys.readouterr().err
    assert "unknown key crops.size" in error and "crops.global_size" in error


def test_a_command_run_from_another_thread_than_the_main_one_runs(capsys):
    # a notebook's or a GUI's worker thread: Python takes signal handlers in its main thread alone
    returned = []
    worker = threading.Thread(target=lambda: returned.append(main(["config", "tiny"])))
    worker.start()
    worker.join(60)
    assert returned == [0] and "arch: vit_small_patch14_dinov2" in capsys.readouterr().out


def test_the_command_line_is_built_without_torch_or_pandas():
    """reddino-train config and every --help start at once: torch, timm, pandas and scipy.stats
    (about five seconds together on a 2-core machine) load only in the commands that use them."""
    code = ("import sys; from reddino_train.cli import build_parser; build_parser(); "
            "print(sorted(set(sys.modules) & {'torch', 'timm', 'pandas', 'scipy.stats'}))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
