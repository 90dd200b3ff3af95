"""Where a training run keeps its files, and when it may replace an embedding.

- ``models/embeddings/<name>.safetensors``: the embedding every UI loads. An existing one is
  replaced only by a run that has earned it: a run that reaches its last step (or stops early by
  its own rule). A cancelled or diverged run with ``if_exists = overwrite`` leaves it untouched
  (issue 17: Cancel at step 1 used to replace a trained file with a 1-step one).
- ``models/inversion_runs/<name>/``: the pack's own folder for a run. ``state.safetensors`` (the
  optimiser, sampler and history, so a run resumes exactly) and, while the file in
  ``models/embeddings`` is protected, ``<name>.safetensors``: the unfinished run's embedding.
  Nothing here is listed by ComfyUI's ``/embeddings`` or scanned by other UIs (a state file
  beside the embedding was offered as ``embedding:<name>.state`` and crashed the prompt).
  ``snapshots/step-000100.safetensors``: the embedding at each scored step (``score_every``, issue
  14), read by Inspect Embedding (``inversion.inspect.load_snapshots``) and by ``keep = "best"``,
  which writes the lowest-score step's vectors as the finished file (the state keeps the last step,
  so resume continues the run). A fresh run clears the snapshots of an earlier run of that name.

A run of several concepts (``RunGroup``: the trainer's own concept plus Add Concept's) keeps each
concept's files by these rules, each in its own ``models/inversion_runs/<name>/`` (its snapshots,
its unfinished embedding), and one state for the whole run (the concepts share the optimiser, the
sampler and the history) in the first concept's folder, which lists the concepts in order; resume
needs the same concepts in the same order. ``if_exists`` applies to each file; a cancelled run
replaces none of them; two concepts of one name are refused.

Older versions wrote ``<name>.state.safetensors`` beside the embedding; ``migrate_side_files``
moves those (only files whose header is a training state) into the runs folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

import comfy.model_management
import folder_paths

from ..inversion.checkpoint import (STATE_SUFFIX, is_state_file, load_state, read_state_meta, save_checkpoint,
                                    state_from_embedding)
from ..inversion.embedding import LearnedEmbedding, validate_name
from ..inversion.formats import load_embedding, save_embedding
from ..inversion.trainer import Trainer, TrainHistory, TrainingDiverged, TrainResult, TrainState
from .comfy_run import embedding_path, warn_user
from .folders import RUNS  # registered with folder_paths there, with the pack's other model folders

__all__ = ["RUNS", "RunFiles", "RunGroup", "runs_dir", "migrate_side_files", "check_names"]

log = logging.getLogger(__name__)

IF_EXISTS = ("error", "overwrite", "resume")


def runs_dir() -> Path:
    """``models/inversion_runs`` (the first folder registered under that name)."""
    return Path(folder_paths.get_folder_paths(RUNS)[0])


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError:  # another file system
        shutil.move(str(src), str(dst))


def migrate_side_files(name: str | None = None) -> list[tuple[Path, Path]]:
    """Move old ``<stem>.state.safetensors`` side files out of the embeddings folders.

    Only files whose header is a training state are moved (an embedding someone named
    ``x.state`` stays); a run folder that already has a state gets the old one as
    ``legacy.state.safetensors``. ``name`` limits the sweep to that concept.
    """
    moved = []
    for folder in folder_paths.get_folder_paths("embeddings"):
        root = Path(folder)
        if not root.is_dir():
            continue
        pattern = f"{name}{STATE_SUFFIX}" if name else f"*{STATE_SUFFIX}"
        for src in sorted(root.glob(pattern)):
            if not src.is_file() or not is_state_file(src):
                continue
            stem = src.name[: -len(STATE_SUFFIX)]
            try:
                validate_name(stem)
            except ValueError:
                continue
            dst = runs_dir() / stem / "state.safetensors"
            if dst.exists():
                dst = dst.with_name("legacy.state.safetensors")
            try:
                _move(src, dst)
            except OSError as e:
                log.warning("could not move the training-state file %s to %s: %s", src, dst, e)
                continue
            log.info("moved the training-state file %s to %s (kept out of models/embeddings)", src, dst)
            moved.append((src, dst))
    return moved


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
class RunFiles:
    """The files of one concept's run, and whether its embedding file is protected."""

    name: str
    embedding: Path  # models/embeddings/<name>.safetensors
    folder: Path  # models/inversion_runs/<name>
    protected: bool  # an existing embedding this run has not yet earned the right to replace
    node: str | None = None

    @property
    def state(self) -> Path:
        return self.folder / "state.safetensors"

    @property
    def snapshots(self) -> Path:
        """The embedding at each scored step: ``snapshots/step-000100.safetensors``."""
        return self.folder / "snapshots"

    def snapshot_path(self, step: int) -> Path:
        return self.snapshots / f"step-{int(step):06d}.safetensors"

    @property
    def unfinished(self) -> Path:
        """The run's embedding while ``embedding`` is protected (beside its state)."""
        return self.folder / f"{self.name}.safetensors"

    @classmethod
    def of(cls, name: str, node: str | None = None) -> "RunFiles":
        """The files of concept ``name`` (nothing is read or written)."""
        try:
            path = Path(embedding_path(name))
        except ValueError as e:
            raise ValueError(f"name: {e}") from None
        return cls(name, path, runs_dir() / name, protected=path.exists(), node=node)

    @classmethod
    def open(cls, name: str, if_exists: str, node: str | None = None) -> tuple["RunFiles", TrainState | None]:
        """The run's files, and the state to resume from (None: a fresh run). Errors name the input."""
        if if_exists not in IF_EXISTS:
            raise ValueError(f"if_exists must be one of {', '.join(IF_EXISTS)}, got {if_exists!r}")
        files = cls.of(name, node)
        migrate_side_files(name)
        path, exists = files.embedding, files.embedding.exists()
        if exists and if_exists == "error":
            raise ValueError(f"name: {path} already exists. Choose another name, or set if_exists to 'overwrite' "
                             "(train anew; the file is replaced when the new run completes) or 'resume' (continue "
                             "training it). If you queued an unchanged graph again, this is your last run's file: "
                             "ComfyUI (v0.33+) dropped that run's result from its cache to free RAM and so ran the "
                             "trainer again; load the file with Load Embedding, or start ComfyUI with "
                             "--cache-classic to keep results cached")
        if if_exists != "resume":
            return files, None
        return files, files._resume_state()

    def _resume_state(self) -> TrainState | None:
        exists = self.embedding.exists()
        meta = read_state_meta(self.state) if self.state.exists() else None
        if self.state.exists() and meta is None:
            load_state(self.state)  # raises the StateFileError that says what to do
        ran = [c.get("name") for c in _state_concepts(meta)] if meta is not None else []
        if len(ran) > 1:  # the state of a run of several concepts: resuming one of them alone cannot be exact
            raise _mismatch(self.state, ran, [self.name])
        if meta is not None and meta.get("embeddings_written") == "0":
            state = load_state(self.state)  # an unfinished run that had not earned the file yet
            if exists:
                warn_user(self.node, f"resuming the unfinished run of {self.name} at step {state.step} (kept in "
                          f"{self.folder}); {self.embedding.name} is replaced only when it completes")
            return state
        if not exists:
            return None
        if meta is not None:
            state = load_state(self.state)
            emb = load_embedding(self.embedding)
            if _same_vectors(state.vectors, emb.vectors) or self._is_best_of(emb, state):
                self.protected = False  # the file is this run's own checkpoint (or its best step)
                return state
            warn_user(self.node, f"{self.state} does not match {self.embedding.name} (the file was replaced after "
                      "that run): resuming from the embedding alone; the optimiser restarts")
        self.protected = False
        return state_from_embedding(self.embedding)

    def checkpoint(self, trainer: Trainer) -> Path:
        """Save the run so far: into models/embeddings, or beside its state while that file is protected."""
        if self.protected:
            save_embedding(trainer.embeddings()[0], self.unfinished, overwrite=True)
            save_checkpoint(trainer, [self.embedding], state_path=self.state, write_embeddings=False)
            return self.unfinished
        return save_checkpoint(trainer, [self.embedding], state_path=self.state)[0]

    def _is_best_of(self, emb: LearnedEmbedding, state: TrainState) -> bool:
        """``emb`` is the best step that ``keep = "best"`` wrote from this run's own snapshot."""
        step = emb.metadata.get("best_step", "")
        if emb.metadata.get("keep") != "best" or not step.isdigit() or int(step) > state.step:
            return False
        path = self.snapshot_path(int(step))
        try:
            return path.is_file() and _same_vectors(load_embedding(path).vectors, emb.vectors)
        except (OSError, ValueError):
            return False

    def snapshot(self, trainer: Trainer) -> Path:
        """Keep the embedding of a scored step (the trainer's ``snapshot`` callback), with its score."""
        return self.save_snapshot(trainer.embeddings()[0], trainer)

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
        """The run's best step (lowest score) from its snapshot, with metadata naming it; None if unscored."""
        best = trainer.history.best()
        if best is None:
            return None
        step, score = best
        path = self.snapshot_path(step)
        if not path.is_file():
            warn_user(self.node, f"keep = best: the snapshot of the best step ({step}, score {score:.4g}) is missing "
                      f"from {self.snapshots}; {self.embedding.name} holds the last step ({trainer.step}) instead")
            return None
        emb = load_embedding(path)
        emb.metadata.update({"keep": "best", "best_step": str(step), "score": repr(float(score)),
                             "steps_trained": str(trainer.step)})
        return emb

    def stopped(self, trainer: Trainer, start: int, why: str) -> Path | None:
        """Keep what a cancelled or diverged run learned, without replacing a file it has not earned."""
        if trainer.step <= start:
            return None
        where = self.checkpoint(trainer)
        if self.protected:
            warn_user(self.node, f"{why} at step {trainer.step}: {self.embedding.name} (an earlier run) is unchanged; "
                      f"this run's vectors are in {where}. Queue again with if_exists = resume to continue it")
        else:
            log.info("%s at step %d; saved %s", why, trainer.step, where)
        return where

    def finish(self, trainer: Trainer) -> tuple[Path, LearnedEmbedding]:
        """The run completed: it has earned the embedding file. With ``keep = "best"`` the file holds
        the best step's vectors (the state still the last step's). Returns the file and what it holds."""
        self.protected = False
        written = self.checkpoint(trainer)
        kept = self.best(trainer) if trainer.config.keep == "best" else None
        if kept is not None:
            written = save_embedding(kept, self.embedding, overwrite=True)
        self.unfinished.unlink(missing_ok=True)
        return written, kept if kept is not None else trainer.embeddings()[0]

    def run(self, trainer: Trainer, callback) -> tuple[TrainResult, Path]:
        """Train to the end and write the embedding it has earned; on Cancel keep what it learned.

        Cancel (ComfyUI's ``InterruptProcessingException``, raised by ``callback`` or before the first
        step) propagates after ``stopped``; a divergence becomes a ValueError that says what was kept.
        """
        result, written = _run_to_end(self, trainer, callback)
        return result, written[0]

    def finish_all(self, trainer: Trainer) -> tuple[list[Path], list[LearnedEmbedding]]:
        """``finish`` as lists (one concept), for ``_run_to_end``."""
        written, kept = self.finish(trainer)
        return [written], [kept]

    def fingerprint(self) -> str:
        """Changes when a resume would start from somewhere else."""
        return "|".join(f"{os.path.getmtime(p)}" if p.exists() else "-" for p in (self.embedding, self.state))


def _run_to_end(files: "RunFiles | RunGroup", trainer: Trainer, callback) -> tuple[TrainResult, list[Path]]:
    """``RunFiles.run`` / ``RunGroup.run``: train, write what the run earned, keep what a stopped one learned."""
    start = trainer.step
    files.clear_snapshots(after=start)
    try:
        comfy.model_management.throw_exception_if_processing_interrupted()  # pressed while encoding
        result = trainer.run(callback)
    except comfy.model_management.InterruptProcessingException:
        files.stopped(trainer, start, "cancelled")
        raise
    except TrainingDiverged as e:
        where = files.stopped(trainer, start, "diverged")
        kept = (f"Saved the last good vectors (step {trainer.step}) to {where}." if where else
                "Nothing was saved: no step of this run was usable.")
        raise ValueError(f"{e} {kept}") from None
    written, kept = files.finish_all(trainer)
    if result.stop_step is not None:
        log.info("%s; wrote %s", result.stop_reason, ", ".join(str(p) for p in written))
    return replace(result, embeddings=kept), written


@dataclass
class RunGroup:
    """The files of a run of several concepts: each concept's ``RunFiles`` (its embedding, and its folder
    with its snapshots and unfinished embedding), and one state for the whole run in the first
    concept's folder (``models/inversion_runs/<first name>/state.safetensors``)."""

    members: list[RunFiles]
    node: str | None = None

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
    def open(cls, names: Sequence[str], if_exists: str, node: str | None = None
             ) -> tuple["RunGroup", TrainState | None]:
        """The run's files and the state to resume from (None: a fresh run). ``if_exists`` applies to each file."""
        if if_exists not in IF_EXISTS:
            raise ValueError(f"if_exists must be one of {', '.join(IF_EXISTS)}, got {if_exists!r}")
        check_names(names)
        group = cls([RunFiles.of(n, node) for n in names], node)
        for n in names:
            migrate_side_files(n)
        existing = [m.embedding for m in group.members if m.embedding.exists()]
        if existing and if_exists == "error":
            raise ValueError(f"name: {', '.join(str(p) for p in existing)} already exist{'s' if len(existing) == 1 else ''}"
                             ". Choose other names, or set if_exists to 'overwrite' (train anew; each file is replaced "
                             "when the new run completes) or 'resume' (continue the run of these concepts)")
        if if_exists != "resume":
            return group, None
        return group, group._resume_state()

    def _resume_state(self) -> TrainState | None:
        meta = read_state_meta(self.state) if self.state.exists() else None
        if self.state.exists() and meta is None:
            load_state(self.state)  # raises the StateFileError that says what to do
        if meta is None:
            self._check_order()
        if meta is not None:
            ran = [c.get("name") for c in _state_concepts(meta)]
            if ran != self.names:
                raise _mismatch(self.state, ran, self.names)
            state = load_state(self.state)
            if meta.get("embeddings_written") == "0":  # an unfinished run that had not earned every file yet
                kept = [m.embedding.name for m in self.members if m.embedding.exists()]
                if kept:
                    warn_user(self.node, f"resuming the unfinished run of {', '.join(self.names)} at step {state.step}"
                              f" (its state in {self.state.parent}); {', '.join(kept)} are replaced only when it "
                              "completes")
                return state
            if self._owns_files(state, meta):
                for m in self.members:
                    m.protected = False
                return state
            warn_user(self.node, f"{self.state} does not match the embedding files of {', '.join(self.names)} (a file "
                      "was replaced after that run): resuming from the embeddings alone; the optimiser restarts")
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
            if not (_same_vectors(rows, emb.vectors) or m._is_best_of(emb, mine)):
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
        embs = [load_embedding(m.embedding) for m in self.members]
        keys = set(embs[0].vectors)
        vectors = {k: torch.cat([e.vectors[k].float() for e in embs]) for k in keys if all(k in e.vectors for e in embs)}
        step = min(int(e.metadata.get("steps", "0") or 0) for e in embs)
        for m in self.members:
            m.protected = False
        return TrainState(step, vectors, {}, {}, TrainHistory())

    def checkpoint(self, trainer: Trainer) -> list[Path]:
        """Save the run so far: each concept's embedding (beside its state while its file is protected) and the
        run's state. Returns where each concept's vectors went."""
        paths = [m.embedding for m in self.members]
        if not self.protected:
            return save_checkpoint(trainer, paths, state_path=self.state)
        out = [save_embedding(e, m.unfinished if m.protected else m.embedding, overwrite=True)
               for m, e in zip(self.members, trainer.embeddings())]
        save_checkpoint(trainer, paths, state_path=self.state, write_embeddings=False)
        return out

    def snapshot(self, trainer: Trainer) -> list[Path]:
        """Keep every concept's embedding of a scored step, each in its own folder."""
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
            warn_user(self.node, f"{why} at step {trainer.step}: {', '.join(kept)} (an earlier run) unchanged; this "
                      f"run's vectors are in {', '.join(str(p) for p in where)}. Queue again with if_exists = resume "
                      "to continue it")
        else:
            log.info("%s at step %d; saved %s", why, trainer.step, ", ".join(str(p) for p in where))
        return where

    def finish_all(self, trainer: Trainer) -> tuple[list[Path], list[LearnedEmbedding]]:
        """The run completed: every concept's file is earned (``keep = "best"``: each holds the run's best step)."""
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
        """``RunFiles.run`` for every concept: the result (each concept's kept embedding) and the files written."""
        return _run_to_end(self, trainer, callback)

    def fingerprint(self) -> str:
        """Changes when a resume would start from somewhere else."""
        return "|".join(m.fingerprint() for m in self.members)
