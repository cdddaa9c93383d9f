"""A run's settings, resolved once: the flags (command line, --config YAML), the paper's spellings, what
a checkpoint contributes to its evaluation and the defaults a backbone's family decides become one
read-only `Settings` before anything is built. Nothing writes to it afterwards; a step that needs other
values makes a new object (`Settings.replace`).

    from_argv(argv, parser)   a script's command line -> Settings (the command recorded as given)
    run_settings(**overrides) what an application runs: train.py's defaults plus keyword overrides, each
                              checked as the command line's; its equivalent command line is recorded
    resolve(ns)               a parsed Namespace -> Settings (the checks and resolutions, in one place)
    command_line(...)         the flags that reproduce a set of overrides, each flag once
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bgmask import args as A
from bgmask.errors import UserError, settings_from_mapping


class FrozenSettingsError(AttributeError):
    """A write to resolved settings."""


class Settings(argparse.Namespace):
    """Resolved, read-only run settings; attribute access as on the parsed Namespace. `given` holds the
    settings chosen explicitly (on the command line, in --config or as overrides) rather than left at
    their defaults; `command` the command line that reproduces the run."""

    __slots__ = ("_given", "_command")

    def __init__(self, values: dict, given=(), command: list[str] | None = None):
        self.__dict__.update(values)
        object.__setattr__(self, "_given", frozenset(given))
        object.__setattr__(self, "_command", list(command) if command is not None else None)

    def __setattr__(self, name, value):
        raise FrozenSettingsError(f"settings are read-only once resolved: cannot set {name!r} (make a new object "
                                  "with .replace)")

    def __delattr__(self, name):
        raise FrozenSettingsError(f"settings are read-only once resolved: cannot delete {name!r}")

    def __reduce__(self):
        return (Settings, (dict(self.__dict__), self._given, self._command))

    @property
    def given(self) -> frozenset:
        return self._given

    @property
    def command(self) -> list[str] | None:
        return self._command

    def replace(self, **changes) -> Settings:
        return Settings({**self.__dict__, **changes}, self._given, self._command)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ------------------------------------------------------------------------------ building settings

def from_argv(argv, parser: argparse.ArgumentParser, **fixed) -> Settings:
    """Parse a script's flags (--config YAML as defaults) and resolve them; `fixed` are values the script
    itself decides (e.g. eval_only for eval_waterbirds.py). The recorded command is this process's."""
    ns, given = parse_noting_given(parser, argv)
    return resolve(argparse.Namespace(**{**vars(ns), **fixed}), given, command=[sys.executable, *sys.argv])


def parse_noting_given(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, set[str]]:
    """(parsed flags, the settings given on the command line or in --config rather than by default)."""
    ns = A.parse_with_config(parser, argv)
    unset = object()
    probe = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    explicit, _ = A.ArgumentParser.parse_known_args(parser, argv, probe)
    given = {k for k, v in vars(explicit).items() if v is not unset}
    if ns.config:
        given |= set(A.read_config(ns.config))
    return ns, given


def run_settings(overrides: dict, source: str = "run settings") -> Settings:
    """train.py's defaults plus `overrides` ({setting: value}, each through the command line's check,
    `bgmask.errors.flag_value`), resolved. The recorded command is the train.py command line that gives
    the same settings (`command_line`)."""
    parser = A.train_flags()
    values = {a.dest: a.default for a in parser._actions if a.dest != argparse.SUPPRESS and a.dest != "help"}
    checked = settings_from_mapping(parser, overrides, source)
    ns = argparse.Namespace(**{**values, **checked})
    return resolve(ns, set(checked), command=command_line(checked, parser))


def train_script(strategy: str) -> str:
    """The entry script whose --strategy choices include `strategy`."""
    from bgmask.masking.strategies import STRATEGIES

    feature_level = STRATEGIES[strategy].masks_features if strategy in STRATEGIES else False
    return "late_masking/train.py" if feature_level else "early_masking_and_baseline/train.py"


def command_line(overrides: dict, parser: argparse.ArgumentParser | None = None, script: str | None = None,
                 program: list[str] | None = None) -> list[str]:
    """`python SCRIPT --flag value ...` (or `PROGRAM --flag value ...`) giving `overrides` on top of the
    parser's defaults (default: train.py's): each flag once, in the parser's order, a value equal to its
    default left out."""
    parser = parser or A.train_flags()
    if program is None:
        program = ["python", script or train_script(overrides.get("strategy", parser.get_default("strategy")))]
    argv = list(program)
    for action in parser._actions:
        if action.dest in overrides and action.option_strings:
            argv += flag_argv(parser, action, overrides[action.dest])
    return argv


def flag_argv(parser: argparse.ArgumentParser, action: argparse.Action, value) -> list[str]:
    """The tokens that set `action.dest` to `value` ([] when that is the default)."""
    if value == action.default:
        return []
    if action.nargs == 0:  # store_true / store_false / store_const: the action whose constant is the value
        match = [a for a in parser._actions if a.dest == action.dest and a.nargs == 0 and a.const == value]
        if not match:
            raise UserError(f"{action.option_strings[0]}: no flag sets it to {value!r}")
        return [match[0].option_strings[0]]
    if value is None:
        raise UserError(f"{action.option_strings[0]}: None is only its default, no flag sets it")
    values = value if isinstance(value, (list, tuple)) else [value]
    return [action.option_strings[0], *(str(v) for v in values)]


def shell_command(settings: Settings) -> str:
    return shlex.join(settings.command or [])


# ------------------------------------------------------------------------------------- resolution

LATE_FLAG_DEFAULTS = A.LATE_FLAG_DEFAULTS


def resolve(ns: argparse.Namespace, given=(), command: list[str] | None = None) -> Settings:
    """The checks and resolutions of a run's flags, in order: the paper's spellings, the mask folder
    alias, flag combinations that cannot work, what an evaluated checkpoint contributes, and the defaults
    the backbone's family decides. Returns them frozen; `ns` is not changed."""
    if isinstance(ns, Settings):
        return ns
    values = dict(vars(ns))
    given = set(given)
    values.update(paper_flags(values))
    values.update(mask_folder(values))
    check_combinations(values)
    if values["eval_only"]:
        values.update(checkpoint_contribution(values, given))
    values.update(family_defaults(values))
    return Settings(values, given, command)


def paper_flags(cfg: dict) -> dict:
    """The paper's spellings as bgmask's flags (config.yaml records what ran), with one line for each
    place where bgmask deliberately does otherwise."""
    from bgmask.distributed import is_main_process

    out = {}
    if cfg["dataset"].lower() != "cub":
        raise UserError(f"--dataset {cfg['dataset']}: CUB-200-2011 (with its Waterbirds folder) is the only dataset")
    if cfg["num_layers_linear_head"] != 1:
        raise UserError(f"--num_layers_linear_head {cfg['num_layers_linear_head']}: only a one-layer (Linear) head "
                        "exists (the paper's code builds that one whatever the flag says)")
    if cfg["model_arch"] in A.DINOV2_SHORTHANDS:  # the paper's DINOv2 scripts always load the pretrained weights
        out.update(model_arch=f"{cfg['model_arch']}_patch14_dinov2.lvd142m", pretrained=True)
    out["pretrained"] = bool(out.get("pretrained") or cfg["pretrained"] or cfg["start_weights"] == "DEFAULT"
                             or cfg["use_orig_dinov2_model"])
    if cfg["fm_second_last_block"] and cfg["feature_masking_last_layer"]:
        raise UserError("--fm_second_last_block and --feature_masking_last_layer exclude each other")
    for flag, stage in (("fm_second_last_block", "second_last"), ("feature_masking_last_layer", "last")):
        if cfg[flag]:
            if cfg["late_mask_stage"] not in ("auto", stage):
                raise UserError(f"--{flag} means --late_mask_stage {stage}, not {cfg['late_mask_stage']}")
            out["late_mask_stage"] = stage
    if cfg["use_amp"] and cfg["amp_dtype"] == "bf16" and is_main_process():
        print("note: --use_amp runs bf16 autocast (the paper: fp16 with a grad scaler; --amp_dtype fp16 for that)",
              flush=True)
    if cfg["eval_mode"] == "test" and not cfg["eval_only"] and is_main_process():
        print("note: --eval_mode test logs CUB test accuracy after each epoch; unlike the paper's snapshot_best.pt, "
              "no checkpoint is ever chosen on test (the final report is the last epoch's)", flush=True)
    return out


def mask_folder(cfg: dict) -> dict:
    """--mask_dir (the late-masking spelling) as --mask_source."""
    if not cfg["mask_dir"]:
        return {}
    if cfg["mask_source"] not in ("gt", cfg["mask_dir"]):
        raise UserError(f"--mask_dir {cfg['mask_dir']} conflicts with --mask_source {cfg['mask_source']}")
    return {"mask_source": cfg["mask_dir"]}


def check_combinations(cfg: dict) -> None:
    """Flag combinations that cannot work, caught before anything is built or written (each numeric
    flag's own range is checked earlier, by the parser: see `bgmask.args.add`)."""
    from bgmask.errors import require_dir

    if not cfg["eval_only"]:  # every augmentation flag checked before the run folder is made
        from bgmask.build import train_transform

        train_transform(argparse.Namespace(**cfg))
    if not cfg["data_path"]:
        raise UserError("--data_path is required (a CUB_200_2011 root, e.g. from `bgmask make-synthetic`)")
    require_dir(cfg["data_path"], "--data_path")  # before the run folder is made
    check_masking(cfg)
    check_training(cfg)
    check_protocol(cfg)


def check_masking(cfg: dict) -> None:
    from bgmask.masking.strategies import create_strategy

    strategy = create_strategy(cfg["strategy"])
    online = (cfg["seg_model_config_path"], cfg["seg_model_checkpoint_path"])
    if any(online) and not cfg["seg_model_checkpoint_path"]:
        raise UserError("--seg_model_config_path needs --seg_model_checkpoint_path")
    if any(online) and not strategy.needs_mask:
        raise UserError(f"an online segmenter is given but --strategy {cfg['strategy']} uses no masks (use early or "
                        "late)")
    late_set = [f"--{k} {cfg[k]}" for k, v in LATE_FLAG_DEFAULTS.items() if cfg[k] != v]
    if late_set and not strategy.masks_features:
        raise UserError(f"{late_set[0]} applies to feature-level masking (--strategy late), not --strategy "
                        f"{cfg['strategy']}")
    if cfg["seg_batch_size"] is not None and not any(online):
        raise UserError("--seg_batch_size applies to the online segmenter (--seg_model_checkpoint_path)")


def check_training(cfg: dict) -> None:
    from bgmask.distributed import resolve_device

    if cfg["wandb_resume_id"] and not (cfg["wandb"] and cfg["resume_training"]):
        raise UserError("--wandb_resume_id continues a wandb run: it needs --wandb and --resume_training")
    if cfg["grad_checkpointing"] and (cfg["freeze_backbone"] or cfg["eval_only"]):
        raise UserError("--grad_checkpointing saves the memory of a fine-tuned backbone's backward pass; with "
                        f"{'--freeze_backbone' if cfg['freeze_backbone'] else '--eval_only'} there is none")
    if cfg["wandb"]:
        from bgmask.errors import require_package

        require_package("wandb", "--wandb", "wandb")
    if cfg["resume_training"] and cfg["eval_only"]:
        raise UserError("--resume_training and --eval_only exclude each other")
    if cfg["use_amp"] and cfg["amp_dtype"] == "fp16" and resolve_device(cfg["device"]).type == "cpu":
        raise UserError("--amp_dtype fp16 needs CUDA; use the default bf16 on CPU")
    if cfg["freeze_backbone"] and cfg["drop_path"] > 0:
        raise UserError("--drop_path has no effect with --freeze_backbone (the backbone runs in eval mode)")
    if cfg["turn_on_mixup_or_cutmix"] and cfg["mixup"] <= 0 and cfg["cutmix"] <= 0:
        raise UserError("--turn_on_mixup_or_cutmix needs --mixup > 0 or --cutmix > 0")
    if not cfg["eval_only"]:
        from bgmask.optim import LRSchedule

        LRSchedule.from_config(argparse.Namespace(**cfg))  # a UserError for values that make no schedule


# Flags of the CUB protocol with no meaning under the Waterbirds one (its folder has its own splits, and
# early masking there masks on the fly: masked copies on disk follow CUB's layout).
CUB_ONLY = {"train_split": "the Waterbirds folder's split 1 is the val split",
            "split_seed": "the Waterbirds folder's splits are fixed",
            "image_sub_path_train": "--strategy early masks the Waterbirds images on the fly"}


def check_protocol(cfg: dict) -> None:
    """--protocol waterbirds without the CUB protocol's flags; a method that reads groups needs it."""
    from bgmask.methods import METHODS

    method = METHODS[cfg["method"]]
    if cfg["protocol"] == "waterbirds":
        for key, why in CUB_ONLY.items():
            if cfg[key] != A.train_flags().get_default(key):
                raise UserError(f"--{key} {cfg[key]} has no meaning with --protocol waterbirds ({why})")
    elif method.needs_groups and not cfg["eval_only"]:
        raise UserError(f"--method {cfg['method']} reads each image's group (waterbird/landbird x water/land): it "
                        "needs --protocol waterbirds")
    if not cfg["eval_only"]:
        method.check(argparse.Namespace(**cfg))


def checkpoint_contribution(cfg: dict, given: set) -> dict:
    """What the evaluated checkpoint decides (`bgmask.checkpoint.checkpoint_settings`)."""
    from bgmask.checkpoint import checkpoint_settings
    from bgmask.runfolder import checkpoint_of

    path = Path(cfg["checkpoint"]) if cfg["checkpoint"] is not None else checkpoint_of(argparse.Namespace(**cfg))
    return checkpoint_settings(path, cfg, arch_given="model_arch" in given)


def family_defaults(cfg: dict) -> dict:
    """What "auto" means for this backbone: --channels_last unset follows the family's preference; a
    feature-level strategy's --late_mask_stage auto is the family's stage (training: an evaluation's model
    comes from its checkpoint)."""
    from bgmask.masking.strategies import STRATEGIES
    from bgmask.models import family_of_arch

    out = {}
    needs_stage = (not cfg["eval_only"] and cfg["late_mask_stage"] == "auto"
                   and STRATEGIES[cfg["strategy"]].masks_features)
    if cfg["channels_last"] is None or needs_stage:
        family = family_of_arch(cfg["model_arch"])
        if cfg["channels_last"] is None:
            out["channels_last"] = family.prefers_channels_last
        if needs_stage:
            out["late_mask_stage"] = family.default_late_stage()
    return out
