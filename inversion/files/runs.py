"""A training run's files, and when it may replace an embedding (the same rules for the nodes and the CLI).

- ``<embeddings>/<name>.safetensors``: the embedding every UI loads. An existing one is replaced only
  by a run that has earned it: a run that reaches its last step (or stops early by its own rule). A
  cancelled or diverged run with ``if_exists = overwrite`` leaves it untouched.
- ``<runs>/<name>/``: the run's own folder. ``state.safetensors`` (the optimiser, sampler, history and
  every parameter group, so a run resumes exactly) and, while the file in ``<embeddings>`` is
  protected, ``<name>.safetensors``: the unfinished run's embedding. ``snapshots/step-000100.safetensors``:
  the embedding at each scored step (``score_every``), read by the inspector and by ``keep = "best"``,
  which writes the lowest-score step's vectors as the finished file (the state keeps the last step, so
  resume continues the run). A fresh run clears the snapshots of an earlier run of that name.

``RunFiles`` holds the files of a run of one concept or of several: each concept's ``ConceptFiles``,
and one state for the whole run (the concepts share the optimiser, the sampler and the history) in
the first concept's folder, which lists the concepts in order; resume needs the same concepts in the
same order. ``if_exists`` applies to each file; a cancelled run replaces none of them; two concepts
of one name are refused. What the user is told goes through ``warn``; which exceptions mean "the
user stopped the run" (``interrupted``: ComfyUI's Cancel, the command line's Ctrl-C) is the caller's.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..embedding import LearnedEmbedding, validate_name
from ..trainer import Trainer, TrainHistory, TrainingDiverged, TrainResult, TrainState
from .checkpoint import load_state, read_state_meta, save_checkpoint, state_from_embedding
from .formats import load_embedding, save_embedding

__all__ = ["IF_EXISTS", "RunFiles", "ConceptFiles", "check_names"]

log = logging.getLogger(__name__)

IF_EXISTS = ("error", "overwrite", "resume")
Warn = Callable[[str], None]


def _log_warning(message: str) -> None:
    log.warning("%s", message)


def _same_vectors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].shape == b[k].shape and torch.equal(a[k].float(), b[k].float()) for k in a)


def _state_concepts(meta: dict[str, str]) -> list[dict]:
    """The concepts a state file's run trained, in order: ``[{"name", "placeholder", "k"}, ...]``."""
    try:
        concepts = json.loads(meta.get("concepts", "[]"))
    except ValueError:
        return []
    return [c for c in concepts if isinstance(c, dict)]


def check_names(names: Sequence[str]) -> None:
    """Refuse a run in which two concepts share a name: each writes models/embeddings/<name>.safetensors."""
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        raise ValueError(f"concepts: the name {dup[0]!r} is given to more than one concept of this run, and each "
                         "concept writes models/embeddings/<name>.safetensors; give each concept its own name (the "
                         "trainer's name input and each Add Concept node's name)")


def _mismatch(state: Path, ran: list[str], names: list[str]) -> ValueError:
    return ValueError(f"if_exists = resume: {state} is the state of a run of {', '.join(ran) or 'unknown concepts'}, "
                      f"but this run trains {', '.join(names)}. To resume it, connect the same concepts in the same "
                      "order (the trainer's own name first, then each Add Concept node's, nearest the trainer last); "
                      "or set if_exists = overwrite to train anew")


@dataclass
class ConceptFiles:
    """The files of one concept of a run, and whether its embedding file is protected."""

    name: str
    embedding: Path  # models/embeddings/<name>.safetensors
    folder: Path  # models/inversion_runs/<name>
    protected: bool  # an existing embedding this run has not yet earned the right to replace
    warn: Warn = _log_warning  # how the user is told

    @property
    def state(self) -> Path:
        """Where a run whose first concept this is keeps its state."""
        return self.folder / "state.safetensors"

    @property
    def snapshots(self) -> Path:
        """The embedding at each scored step: ``snapshots/step-000100.safetensors``."""
        return self.folder / "snapshots"

    def snapshot_path(self, step: int) -> Path:
        return self.snapshots / f"step-{int(step):06d}.safetensors"

    @property
    def unfinished(self) -> Path:
        """The run's embedding while ``embedding`` is protected (in its run folder)."""
        return self.folder / f"{self.name}.safetensors"

    @classmethod
    def at(cls, name: str, embeddings: Path, runs: Path, warn: Warn = _log_warning) -> "ConceptFiles":
        """The files of concept ``name``: ``embeddings/<name>.safetensors`` and ``runs/<name>/`` (nothing is
        read or written)."""
        try:
            validate_name(name)
        except ValueError as e:
            raise ValueError(f"name: {e}") from None
        path = Path(embeddings) / f"{name}.safetensors"
        return cls(name, path, Path(runs) / name, protected=path.exists(), warn=warn)

    def is_best_of(self, emb: LearnedEmbedding, state: TrainState) -> bool:
        """``emb`` is the best step that ``keep = "best"`` wrote from this run's own snapshot."""
        step = emb.metadata.get("best_step", "")
        if emb.metadata.get("keep") != "best" or not step.isdigit() or int(step) > state.step:
            return False
        path = self.snapshot_path(int(step))
        try:
            return path.is_file() and _same_vectors(load_embedding(path).vectors, emb.vectors)
        except (OSError, ValueError):
            return False

    def save_snapshot(self, emb: LearnedEmbedding, trainer: Trainer) -> Path:
        """``emb`` (this concept's vectors at the trainer's step) as that step's snapshot, with its score."""
        score = trainer.history.score[-1]
        emb = LearnedEmbedding(emb.name, emb.vectors, emb.placeholder, {**emb.metadata, "score": repr(float(score))})
        return save_embedding(emb, self.snapshot_path(trainer.step), overwrite=True)

    def clear_snapshots(self, after: int = 0) -> None:
        """Remove the snapshots of steps after ``after`` (all of them for a fresh run): they belong to
        an earlier run of this name, and ``keep = "best"`` must never pick one."""
        if not self.snapshots.is_dir():
            return
        for path in self.snapshots.glob("step-*.safetensors"):
            digits = path.name[len("step-"):-len(".safetensors")]
            if digits.isdigit() and int(digits) > after:
                path.unlink(missing_ok=True)

    def best(self, trainer: Trainer) -> LearnedEmbedding | None:
        """The run's best step (lowest score) from this concept's snapshot, with metadata naming it; None if
        unscored or if the snapshot is missing (said in a toast)."""
        best = trainer.history.best()
        if best is None:
            return None
        step, score = best
        path = self.snapshot_path(step)
        if not path.is_file():
            self.warn(f"keep = best: the snapshot of the best step ({step}, score {score:.4g}) is missing "
                      f"from {self.snapshots}; {self.embedding.name} holds the last step ({trainer.step}) instead")
            return None
        emb = load_embedding(path)
        emb.metadata.update({"keep": "best", "best_step": str(step), "score": repr(float(score)),
                             "steps_trained": str(trainer.step)})
        return emb

    def fingerprint(self) -> str:
        """Changes when a resume would start from somewhere else."""
        return "|".join(f"{os.path.getmtime(p)}" if p.exists() else "-" for p in (self.embedding, self.state))


def _exists_message(existing: list[Path]) -> str:
    one = len(existing) == 1
    return (f"name: {', '.join(str(p) for p in existing)} already exist{'s' if one else ''}. Choose "
            f"{'another name' if one else 'other names'}, or set if_exists to 'overwrite' (train anew; "
            f"{'the file is' if one else 'each file is'} replaced when the new run completes) or 'resume' (continue "
            f"{'training it' if one else 'the run of these concepts'}). If you queued an unchanged graph again, "
            f"{'this is' if one else 'these are'} your last run's file{'' if one else 's'}: ComfyUI (v0.33+) dropped "
            "that run's result from its cache to free RAM and so ran the trainer again; load the file with Load "
            "Embedding, or start ComfyUI with --cache-classic to keep results cached")


@dataclass
class RunFiles:
    """The files of a training run of one concept or several: each concept's ``ConceptFiles``, and one state
    for the whole run in the first concept's folder (``models/inversion_runs/<first name>/state.safetensors``)."""

    members: list[ConceptFiles]
    warn: Warn = _log_warning
    # What stops a run from outside (ComfyUI's Cancel, Ctrl-C): it keeps what it learned and re-raises.
    interrupted: tuple[type[BaseException], ...] = (KeyboardInterrupt,)
    check_cancel: Callable[[], None] = field(default=lambda: None)  # raises one of ``interrupted`` if pressed

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def state(self) -> Path:
        return self.members[0].state

    @property
    def protected(self) -> bool:
        """Some concept's embedding file is one this run has not yet earned the right to replace."""
        return any(m.protected for m in self.members)

    @classmethod
    def at(cls, names: str | Sequence[str], embeddings: Path, runs: Path, **kw) -> "RunFiles":
        """The files of a run of ``names`` (a name, or the concepts in order) with its embeddings in
        ``embeddings`` and its folders in ``runs``; ``kw``: ``warn``, ``interrupted``, ``check_cancel``.
        Nothing is read or written."""
        names = [names] if isinstance(names, str) else list(names)
        return cls([ConceptFiles.at(n, embeddings, runs, kw.get("warn", _log_warning)) for n in names], **kw)

    @classmethod
    def open(cls, names: str | Sequence[str], if_exists: str, embeddings: Path, runs: Path, **kw
             ) -> tuple["RunFiles", TrainState | None]:
        """The run's files and the state to resume from (None: a fresh run). ``if_exists`` applies to each file;
        errors name the input."""
        if if_exists not in IF_EXISTS:
            raise ValueError(f"if_exists must be one of {', '.join(IF_EXISTS)}, got {if_exists!r}")
        names = [names] if isinstance(names, str) else list(names)
        check_names(names)
        files = cls.at(names, embeddings, runs, **kw)
        existing = [m.embedding for m in files.members if m.embedding.exists()]
        if existing and if_exists == "error":
            raise ValueError(_exists_message(existing))
        if if_exists != "resume":
            return files, None
        return files, files._resume_state()

    def _resume_state(self) -> TrainState | None:
        meta = read_state_meta(self.state) if self.state.exists() else None
        if self.state.exists() and meta is None:
            load_state(self.state)  # raises the StateFileError that says what to do
        if meta is None:
            self._check_order()
            return self._from_embeddings()
        ran = [c.get("name") for c in _state_concepts(meta)]
        if ran != self.names:
            raise _mismatch(self.state, ran, self.names)
        if meta.get("embeddings_written") == "0":  # an unfinished run that had not earned every file yet
            state = load_state(self.state)
            kept = [m.embedding.name for m in self.members if m.embedding.exists()]
            if kept:
                one = len(kept) == 1
                self.warn(f"resuming the unfinished run of {', '.join(self.names)} at step {state.step} "
                          f"(kept in {self.state.parent}); {', '.join(kept)} {'is' if one else 'are'} replaced only "
                          "when it completes")
            return state
        if not any(m.embedding.exists() for m in self.members):
            return None  # the files that run wrote are gone: train anew
        state = load_state(self.state)
        if self._owns_files(state, meta):
            for m in self.members:
                m.protected = False
            return state
        self.warn(f"{self.state} does not match the embedding file{'s' if len(self.members) > 1 else ''} of "
                  f"{', '.join(self.names)} (replaced after that run): resuming from the embedding"
                  f"{'s' if len(self.members) > 1 else ''} alone; the optimiser restarts")
        return self._from_embeddings()

    def _check_order(self) -> None:
        """Refuse to resume these concepts in another order than their run's (its state is in another's folder)."""
        for m in self.members[1:]:
            meta = read_state_meta(m.state) if m.state.exists() else None
            ran = [c.get("name") for c in _state_concepts(meta)] if meta is not None else []
            if sorted(ran) == sorted(self.names):
                raise _mismatch(m.state, ran, self.names)

    def _owns_files(self, state: TrainState, meta: dict[str, str]) -> bool:
        """Every concept's file holds its rows of ``state`` (or that run's best step)."""
        start = 0
        for m, c in zip(self.members, _state_concepts(meta)):
            k = int(c.get("k", 0))
            rows = {key: v[start:start + k] for key, v in state.vectors.items()}
            start += k
            if not m.embedding.exists():
                return False
            emb = load_embedding(m.embedding)
            mine = TrainState(state.step, rows, {}, {}, state.history)
            if not (_same_vectors(rows, emb.vectors) or m.is_best_of(emb, mine)):
                return False
        return True

    def _from_embeddings(self) -> TrainState | None:
        """Resume from the concepts' embedding files alone (the optimiser restarts); None if none exists."""
        missing = [m for m in self.members if not m.embedding.exists()]
        if len(missing) == len(self.members):
            return None
        if missing:
            raise ValueError(f"if_exists = resume: {', '.join(str(m.embedding) for m in missing)} do not exist, but "
                             "resume continues every concept of the run from its file. Set if_exists = overwrite "
                             "to train them all anew, or remove the concepts that have no file from the run")
        for m in self.members:
            m.protected = False
        if len(self.members) == 1:
            return state_from_embedding(self.members[0].embedding)
        embs = [load_embedding(m.embedding) for m in self.members]
        keys = set(embs[0].vectors)
        vectors = {k: torch.cat([e.vectors[k].float() for e in embs]) for k in keys if all(k in e.vectors for e in embs)}
        step = min(int(e.metadata.get("steps", "0") or 0) for e in embs)
        return TrainState(step, vectors, {}, {}, TrainHistory())

    def checkpoint(self, trainer: Trainer) -> list[Path]:
        """Save the run so far: each concept's embedding (in its run folder while its file is protected) and the
        run's state. Returns where each concept's vectors went."""
        paths = [m.embedding for m in self.members]
        if not self.protected:
            return save_checkpoint(trainer, paths, state_path=self.state)
        out = [save_embedding(e, m.unfinished if m.protected else m.embedding, overwrite=True)
               for m, e in zip(self.members, trainer.embeddings())]
        save_checkpoint(trainer, paths, state_path=self.state, write_embeddings=False)
        return out

    def snapshot(self, trainer: Trainer) -> list[Path]:
        """Keep every concept's embedding of a scored step, each in its own folder (the trainer's ``snapshot``)."""
        return [m.save_snapshot(e, trainer) for m, e in zip(self.members, trainer.embeddings())]

    def clear_snapshots(self, after: int = 0) -> None:
        for m in self.members:
            m.clear_snapshots(after)

    def stopped(self, trainer: Trainer, start: int, why: str) -> list[Path] | None:
        """A cancelled or diverged run: keep what it learned, replacing no file it has not earned."""
        if trainer.step <= start:
            return None
        where = self.checkpoint(trainer)
        kept = [m.embedding.name for m in self.members if m.protected]
        if kept:
            self.warn(f"{why} at step {trainer.step}: {', '.join(kept)} (an earlier run) "
                      f"{'is ' if len(kept) == 1 else ''}unchanged; this run's vectors are in "
                      f"{', '.join(str(p) for p in where)}. Queue again with if_exists = resume to continue it")
        else:
            log.info("%s at step %d; saved %s", why, trainer.step, ", ".join(str(p) for p in where))
        return where

    def finish(self, trainer: Trainer) -> tuple[list[Path], list[LearnedEmbedding]]:
        """The run completed: every concept's file is earned (``keep = "best"``: each holds the run's best step,
        the state still the last step's). Returns the files written and what each holds."""
        for m in self.members:
            m.protected = False
        written = self.checkpoint(trainer)
        kept = trainer.embeddings()
        if trainer.config.keep == "best":
            for i, m in enumerate(self.members):
                best = m.best(trainer)
                if best is not None:
                    written[i] = save_embedding(best, m.embedding, overwrite=True)
                    kept[i] = best
        for m in self.members:
            m.unfinished.unlink(missing_ok=True)
        return written, kept

    def run(self, trainer: Trainer, callback) -> tuple[TrainResult, list[Path]]:
        """Train to the end and write the embeddings the run has earned; on Cancel keep what it learned.

        A stop from outside (``interrupted``: ComfyUI's Cancel, Ctrl-C; raised by ``callback``, by
        ``check_cancel`` before the first step, or by the user) propagates after ``stopped``; a divergence becomes a ValueError that says what was kept. Returns the
        result (each concept's kept embedding) and the files written, in concept order."""
        start = trainer.step
        self.clear_snapshots(after=start)
        try:
            self.check_cancel()  # pressed while the images were encoded
            result = trainer.run(callback)
        except self.interrupted:
            self.stopped(trainer, start, "cancelled")
            raise
        except TrainingDiverged as e:
            where = self.stopped(trainer, start, "diverged")
            kept = (f"Saved the last good vectors (step {trainer.step}) to {', '.join(str(p) for p in where)}."
                    if where else "Nothing was saved: no step of this run was usable.")
            raise ValueError(f"{e} {kept}") from None
        written, kept = self.finish(trainer)
        if result.stop_step is not None:
            log.info("%s; wrote %s", result.stop_reason, ", ".join(str(p) for p in written))
        return replace(result, embeddings=kept), written

    def fingerprint(self) -> str:
        """Changes when a resume would start from somewhere else."""
        return "|".join(m.fingerprint() for m in self.members)
