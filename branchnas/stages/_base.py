"""The stage contract: what every pipeline stage declares, and the registry that holds them.

A stage is an object registered by name. It declares

* ``requires``: the stages whose artifacts it reads (``dependencies`` may add some that depend
  on the recipe, such as the affinity for ``finetune.init = "central"``);
* ``keyed_on``: the subset of those whose *fingerprints* make up its own. A stage keyed on
  content instead (fine-tuning is keyed on the tree it trains, not on how the search was called)
  adds that content in :meth:`Stage.fingerprint_extra`;
* ``artifacts``: the files it writes into its folder, read by consumers through the stage's
  typed readers (:meth:`Stage.path` refuses an undeclared name);
* :meth:`Stage.check`: every error knowable from the recipe, the data layout and the installed
  packages, raised as a :class:`~branchnas.errors.UserError` before any stage does work;
* :meth:`Stage.run`: the work, writing into a staging folder that the run directory swaps in
  only on success (:meth:`branchnas.rundir.RunDir.run_stage`).

No stage imports the pipeline: :mod:`branchnas.pipeline` resolves the dependency closure
from these declarations and runs each stage once its inputs are done.

This module imports neither torch nor numpy, so the command line can list the stages in
``--help`` without loading them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from branchnas.errors import UserError, unknown_choice

if TYPE_CHECKING:
    from branchnas.recipe import Recipe
    from branchnas.rundir import RunDir

__all__ = ["Artifact", "Stage", "StageContext", "register_stage", "get_stage", "stage_names", "stage_config",
           "is_current", "REGISTRY"]


@dataclass(frozen=True)
class Artifact:
    """A file a stage writes into its folder.

    Attributes:
        name: the file name inside the stage's folder (``tree.json``); a ``*`` pattern
            (``*.pt``) stands for several files of one kind.
        description: what it holds, for the docs.
    """

    name: str
    description: str


@dataclass
class StageContext:
    """What :meth:`Stage.run` gets.

    Attributes:
        recipe: the resolved recipe.
        rundir: the run directory (read upstream artifacts through the stages' readers).
        folder: the staging folder to write this stage's artifacts into. It becomes the
            stage's folder only when ``run`` returns; a killed run finds its checkpoints here.
        options: this invocation's options for the stage (``branchnas search --affinity``,
            ``branchnas pretrain --tasks``, ...), which are not recipe keys.
        progress: show progress bars.
    """

    recipe: Recipe
    rundir: RunDir
    folder: Path
    options: Mapping[str, Any] = field(default_factory=dict)
    progress: bool = True


class Stage:
    """Base class of the pipeline stages; subclasses register with :func:`register_stage`.

    Class attributes:
        name: the stage's name (its command and its folder in the run directory).
        summary: one line for ``branchnas --help`` and the docs.
        requires: the stages it always reads.
        optional: ``True`` when ``branchnas run`` leaves it out by default (``compare``, ``tune``).
        artifacts: the files it writes.
        distributed: ``True`` when, under torchrun, every process runs :meth:`run` (the stages
            that train under DDP: ``pretrain``, ``finetune``); rank 0 alone writes the files
            (:func:`branchnas.training.distributed.is_main`). Otherwise rank 0 runs the stage by
            itself while the other processes wait.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[bool] = False
    artifacts: ClassVar[tuple[Artifact, ...]] = ()
    distributed: ClassVar[bool] = False

    # -- declarations that may depend on the recipe

    def enabled(self, recipe: Recipe) -> bool:
        """Whether ``branchnas run`` runs the stage with this recipe (default: unless ``optional``)."""
        return not self.optional

    def dependencies(self, recipe: Recipe, options: Mapping[str, Any]) -> tuple[str, ...]:
        """The stages this run of the stage reads (default: ``requires``)."""
        return self.requires

    def keyed_on(self, recipe: Recipe, options: Mapping[str, Any]) -> tuple[str, ...]:
        """The dependencies whose fingerprints enter this stage's fingerprint (default: all)."""
        return self.dependencies(recipe, options)

    def config(self, recipe: Recipe, options: Mapping[str, Any]) -> dict[str, Any]:
        """The part of the recipe (and of the options) that the stage's result depends on."""
        return {}

    def fingerprint_extra(self, recipe: Recipe, rundir: RunDir, options: Mapping[str, Any]) -> dict[str, Any]:
        """Content read from upstream artifacts that keys the stage (called once they are done)."""
        return {}

    # -- the work

    def check(self, recipe: Recipe, options: Mapping[str, Any]) -> None:
        """Raise a :class:`~branchnas.errors.UserError` for anything knowable before any work.

        Must be cheap (no training) and must not write anything.
        """

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Do the work into ``ctx.folder``.

        Returns:
            ``{"outputs": [file names relative to the folder], **extras}``; the extras go into
            the stage's manifest entry. ``"partial": True`` keeps the staging folder unswapped
            (work remains, e.g. ``pretrain --tasks``).
        """
        raise NotImplementedError

    # -- artifacts

    def folder(self, rundir: RunDir) -> Path:
        """The stage's folder in ``rundir`` (not created)."""
        return Path(rundir.path) / self.name

    def path(self, rundir: RunDir, name: str) -> Path:
        """The path of artifact ``name`` (a declared one) in the stage's folder."""
        if not any(_matches(a.name, name) for a in self.artifacts):
            raise ValueError(f"stage '{self.name}' declares no artifact {name!r}")
        return self.folder(rundir) / name

    def require(self, rundir: RunDir, name: str) -> Path:
        """Like :meth:`path`, but a missing file is a user error naming the command that writes it."""
        path = self.path(rundir, name)
        if not path.exists():
            raise UserError(f"{path} does not exist; run `branchnas {self.name}` first")
        return path


    def read_json(self, rundir: RunDir, name: str) -> Any:
        """Artifact ``name`` parsed as JSON; missing or damaged is a user error naming the fix."""
        import json

        path = self.require(rundir, name)
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is damaged ({err}); run `branchnas {self.name} --force` to rebuild it") from None


def _matches(pattern: str, name: str) -> bool:
    if "*" not in pattern:
        return pattern == name
    head, tail = pattern.split("*", 1)
    return name.startswith(head) and name.endswith(tail) and len(name) >= len(head) + len(tail)


#: name -> stage, in registration order.
REGISTRY: dict[str, Stage] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: register one instance of ``cls`` under ``cls.name`` (duplicates refused)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY:
        raise ValueError(f"a stage named '{cls.name}' is already registered ({type(REGISTRY[cls.name]).__name__})")
    unknown = [r for r in cls.requires if r not in REGISTRY]
    if unknown:
        raise ValueError(f"stage '{cls.name}' requires unregistered stage(s): {', '.join(unknown)}")
    REGISTRY[cls.name] = cls()
    return cls


def get_stage(name: str) -> Stage:
    """The registered stage ``name``; an unknown name is a user error listing the valid ones."""
    from branchnas import stages  # noqa: F401  (registers the built-in stages)

    if name not in REGISTRY:
        raise UserError(unknown_choice("stage", name, REGISTRY))
    return REGISTRY[name]


def stage_names(*, include_optional: bool = True) -> list[str]:
    """The registered stages in dependency order (registration order breaks ties)."""
    from branchnas import stages  # noqa: F401

    return [n for n, s in REGISTRY.items() if include_optional or not s.optional]


def closure(targets: Sequence[str], recipe: Recipe, options: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """``targets`` and every stage they depend on, in dependency order."""
    needed: set[str] = set()
    todo = [get_stage(t).name for t in targets]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        todo.extend(get_stage(name).dependencies(recipe, options.get(name, {})))
    return [n for n in REGISTRY if n in needed]


def stage_config(name: str, recipe: Recipe, rundir: RunDir, options: Mapping[str, Any]) -> dict[str, Any]:
    """The config that keys stage ``name``: its recipe part plus the upstream content it is keyed on."""
    stage = get_stage(name)
    config = stage.config(recipe, options)
    extra = stage.fingerprint_extra(recipe, rundir, options)
    return {**config, "keyed_on_content": extra} if extra else config


def is_current(name: str, recipe: Recipe, rundir: RunDir, options: Mapping[str, Any] | None = None) -> bool:
    """True when stage ``name`` is done with the inputs this recipe gives it now, its outputs intact.

    Read-only (no lock): for a stage that reads another's optional result (``export`` reads
    ``tune``'s model when it is there) and for workers that only read a run directory.
    """
    options = options or {}
    stage = get_stage(name)
    try:
        config = stage_config(name, recipe, rundir, options)
        fp = rundir.stage_fingerprint(name, config, list(stage.keyed_on(recipe, options)))
    except UserError:  # an upstream stage is not done
        return False
    return rundir.is_done(name, fp)
