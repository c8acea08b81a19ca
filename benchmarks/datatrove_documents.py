"""datatrove on the benchmark corpus, in its own virtualenv, two workers (one per core): Gopher quality +
repetition filtering, then its 4-stage MinHash pipeline with the same config (5-grams, 14x8).
Prints one JSON line; the caller measures time and memory."""

from __future__ import annotations

import glob
import gzip
import json
import sys
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import (
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

WORKERS = 2  # both cores, over the corpus's two files


def run(pipeline, work: Path, name: str, tasks: int = WORKERS) -> None:
    LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(tasks, WORKERS),
                          logging_dir=str(work / f"logs-{name}"), skip_completed=False).run()


def count(folder: Path) -> int:
    return sum(1 for f in glob.glob(str(folder / "*")) for _ in gzip.open(f))


def main(phase: str, corpus: str, work_dir: str) -> None:
    work = Path(work_dir)
    if phase == "filter":
        run([JsonlReader(corpus, glob_pattern="corpus-*.jsonl"), GopherQualityFilter(), GopherRepetitionFilter(),
             JsonlWriter(str(work / "filtered"))], work, "filter")
        print(json.dumps({"kept": count(work / "filtered")}))
        return
    cfg = MinhashConfig()
    run([JsonlReader(corpus, glob_pattern="corpus-*.jsonl"), MinhashDedupSignature(str(work / "sigs"), config=cfg)],
        work, "sig")
    run([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)], work, "buckets",
        tasks=cfg.num_buckets)
    run([MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=cfg, save_cluster_id=True)],
        work, "cluster", tasks=1)
    run([JsonlReader(corpus, glob_pattern="corpus-*.jsonl"),
         MinhashDedupFilter(str(work / "remove"), exclusion_writer=JsonlWriter(str(work / "excluded")),
                            load_cluster_ids=True),
         JsonlWriter(str(work / "deduped"))], work, "filter-dups")
    clusters, removed = {}, []
    for folder in ("deduped", "excluded"):
        for f in glob.glob(str(work / folder / "*")):
            for line in gzip.open(f):
                doc = json.loads(line)
                clusters[doc["id"]] = doc["metadata"].get("minhash_cluster_id", -1)
                if folder == "excluded":
                    removed.append(doc["id"])
    (work / "removed.json").write_text(json.dumps({"removed": sorted(removed), "clusters": clusters}))
    print(json.dumps({"docs": len(clusters), "removed_file": str(work / "removed.json")}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
