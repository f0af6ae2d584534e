"""task=pipeline's analysis passes double as the forward passes of task=train's paired outcome pass on the held-out
split, so a pipeline runs each model over those sentences once (docs/training.md#what-is-measured-where).

- Step 1 analyses the base model on `data.splits.analysis`; when that is the held-out split and the paired pass would
  see the same tokens the same way (`BasePassRecording.for_pipeline`), the engine also hands every batch to a
  `BaseSideRecorder` per measured language: the base side of the paired pass, cached under task=train's key and kept in
  memory for step 2.
- Step 2 trains, then measures the adapter on the held-out split with the analysis engine (`AdaptedPassRecording`):
  one pass computes the adapted model's analysis statistics (cached under the adapter's key, and kept in memory for
  step 3) and, through an `AdaptedSideRecorder` per language, the paired outcome sums against step 1's base side.
- Step 3 then finds the adapted model's statistics computed; only the listed features' second pass runs.

Anywhere the conditions do not hold, each step measures on its own as task=train and task=analyze do (same numbers).
"""

from __future__ import annotations

import hashlib
import logging

from mlalign.training import base_cache
from mlalign.training.outcomes import AdaptedSideRecorder, BaseSide, BaseSideRecorder, PairedSums

log = logging.getLogger(__name__)


def text_hash(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


class BasePassRecording:
    """Step 1's recording of the paired pass's base side, for the languages training measures (targets + reference).

    The recorded sides are written to the base-side cache (under the key task=train computes) and kept in memory,
    keyed by a hash of each language's sentences, for `base_cache.base_sides(recorded=...)` (so `analysis.cache=false`
    works too, and different sentences are never mixed up)."""

    def __init__(self, cfg, testbed_dir, split: str, langs: list[str], precision: str):
        self.cfg, self.testbed_dir, self.split, self.langs, self.precision = cfg, testbed_dir, split, langs, precision
        self._recorders: dict[str, BaseSideRecorder] = {}
        self._text_hash: dict[str, str] = {}
        self.sides: dict[str, BaseSide] = {}

    def keep_analysis(self, stats: dict, feature_stats: dict) -> None:
        """Called by `analysis.sources.cached_stats` after the pass it recorded: the base model's statistics are already
        in the analysis cache and nothing later reads them from here, so nothing is kept."""

    @classmethod
    def for_pipeline(cls, cfg, ctx, langs: list[str]) -> "BasePassRecording | None":
        """A recording when step 1's analysis pass sees the held-out tokens exactly as the paired pass does (same
        split, every position but BOS, no mixed precision), else None and a log line saying why."""
        from mlalign.training.loop import resolve_mixed_precision

        precision = resolve_mixed_precision(cfg.train.mixed_precision, str(cfg.model.device) == "cpu")
        acfg = cfg.analysis
        reasons = []
        if str(cfg.data.splits.analysis) != str(cfg.data.splits.heldout):
            reasons.append(f"data.splits.analysis={cfg.data.splits.analysis} is not the held-out split "
                           f"{cfg.data.splits.heldout}")
        if int(acfg.get("min_position") or 0) != 0 or acfg.get("max_position") is not None:
            reasons.append("analysis.min_position/max_position narrow the analysed positions")
        if precision != "no":
            reasons.append(f"training measures under mixed precision {precision}")
        if reasons:
            log.info("the held-out split is measured by training and by the analysis separately: %s", "; ".join(reasons))
            return None
        return cls(cfg, ctx.testbed_dir, str(cfg.data.splits.heldout), list(langs), precision)

    def recorders(self, texts_by_lang: dict[str, list[str]], layers: list[int]) -> dict[str, BaseSideRecorder]:
        """{lang: BaseSideRecorder} for the engine's pass over `texts_by_lang` at `layers` (the languages it records)."""
        centres = self.centres(layers)
        self._recorders = {lang: BaseSideRecorder(len(texts), layers, "cpu", centres)
                           for lang, texts in texts_by_lang.items() if lang in self.langs}
        self._text_hash.update({lang: text_hash(texts_by_lang[lang]) for lang in self._recorders})
        return self._recorders

    def centres(self, layers: list[int]) -> dict:
        """Each layer's SAE b_dec (the norm-matched control's centre), read from the SAE files the analysis loads."""
        from mlalign.saes import load_sae
        from mlalign.analysis.norm_matched import sae_centres

        d_model = int(self.cfg.model.hidden_size)
        return sae_centres({layer: load_sae(self.cfg.sae, layer, d_model) for layer in layers})

    def finish(self, d_model: int, layers: list[int], write: bool = True) -> None:
        """Finalise what the pass recorded; cache it under task=train's key for `layers` (the analysed layers)."""
        sides = {lang: recorder.finalize(d_model) for lang, recorder in self._recorders.items()}
        self._recorders = {}
        for lang, side in sides.items():
            if lang in self.sides:
                self.sides[lang].layers.update(side.layers)
            else:
                self.sides[lang] = side
        if write and sides:
            base_cache.save(base_cache.open_cache(self.cfg, self.testbed_dir, self.split, layers, self.precision), sides)

    def sides_for(self, texts_by_lang: dict[str, list[str]]) -> dict[str, BaseSide]:
        """The recorded sides of the languages whose sentences are exactly `texts_by_lang`'s."""
        return {lang: self.sides[lang] for lang, texts in texts_by_lang.items()
                if lang in self.sides and self._text_hash.get(lang) == text_hash(texts)}


class AdaptedPassRecording:
    """Step 2's measurement of the adapter on the held-out split, run by the analysis engine: `paired` (language ->
    `PairedSums` against `base`) for the outcome report, and `stats` / `feature_stats` (the adapted model's analysis
    statistics, every analysed language and layer) for step 3."""

    def __init__(self, base: dict[str, BaseSide], texts_by_lang: dict[str, list[str]], saes: dict, metric: str,
                 device):
        self.base, self.saes, self.metric, self.device = base, saes, metric, device
        self._text_hash = {lang: text_hash(texts) for lang, texts in texts_by_lang.items() if lang in base}
        self._recorders: dict[str, AdaptedSideRecorder] = {}
        self.paired: dict[str, PairedSums] = {}
        self.stats: dict = {}
        self.feature_stats: dict = {}

    def keep_analysis(self, stats: dict, feature_stats: dict) -> None:
        """Called by `analysis.sources.cached_stats` after the pass it recorded: the adapted model's statistics, which
        step 3 reads (`cached_stats(computed_before=...)`) instead of running the pass again."""
        self.stats, self.feature_stats = stats, feature_stats

    def recorders(self, texts_by_lang: dict[str, list[str]], layers: list[int]) -> dict[str, AdaptedSideRecorder]:
        missing = sorted(set(self.saes) - set(layers))
        if missing:  # some layers came from the analysis cache: the paired pass is measured on its own instead
            return {}
        self._recorders = {lang: AdaptedSideRecorder(self.base[lang], self.saes, self.metric, self.device)
                           for lang, texts in texts_by_lang.items()
                           if lang in self._text_hash and self._text_hash[lang] == text_hash(texts)}
        return self._recorders

    def finish(self, d_model: int, layers: list[int], write: bool = True) -> None:
        self.paired.update({lang: recorder.finalize() for lang, recorder in self._recorders.items()})
        self._recorders = {}

    def complete(self) -> bool:
        """Every measured language's paired sums came from the analysis pass."""
        return set(self.paired) == set(self._text_hash)
