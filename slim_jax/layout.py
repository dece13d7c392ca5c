"""The work directory's layout: the names under which stages hand files to each other.

`workdir/<stage>/` holds a stage's output (its directory is named as the stage), the pipeline's
bookkeeping (DONE, CONFIG) and the artifacts below. A name that one module writes and another
reads is defined here, once; names a module keeps to itself stay in that module.
"""

# The stages, in the order the pipeline runs them (pipeline.STAGES).
FETCH = "fetch"
PREPARE = "prepare"
CONVERT = "convert"
TEACHER = "teacher"
DISTILL = "distill"
EXPORT = "export"  # on request only: not among the stages a plain run runs
GENERATE = "generate"
ENCODE = "encode"
TRAIN = "train"
REPORT = "report"

# pipeline.py's bookkeeping in every stage directory.
DONE = "DONE"  # {"config": the sections the stage ran with, "summary": what it returned}
CONFIG = "CONFIG"  # the sections a (possibly interrupted) run of the stage began with

RATIONALES = "rationales.jsonl"  # teacher/, generate/: a rationale per user (and split)
CACHE = "cache.jsonl"  # teacher/, generate/: every request's outcome, so that a rerun resumes
EMBEDDED_LLM = "smollm2-135m-instruct"  # convert/: the embedded GGUF as a Hugging Face directory
ADAPTER = "adapter"  # distill/: the student's LoRA adapter, a PEFT directory
ITEM_VECTORS = "item_vectors.npy"  # encode/: a vector per item text
METRICS = "metrics.json"  # train/<variant>/: the variant's metrics; train/: all of them
RANKED_TEST = "ranked_test.npz"  # train/<variant>/: each test user's rank of the target, top-K
