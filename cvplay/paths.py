"""Where each stage reads and writes, relative to the project root (dvc.yaml names the same)."""

from pathlib import Path

DATA = Path("data")
PACKED_TRAIN = DATA / "packed" / "train.pt"
PACKED_TEST = DATA / "packed" / "test.pt"
TRAIN_DIR = DATA / "train"
TEST_DIR = DATA / "test"
FEATURES_DIR = DATA / "features"
FEATURES_TRAIN = FEATURES_DIR / "train.pt"
FEATURES_TEST = FEATURES_DIR / "test.pt"
FEATURES_LAYER4 = FEATURES_DIR / "layer4.pt"
MODELS = Path("models")
BEST = MODELS / "best.pt"
LAST = MODELS / "last.pt"
METRICS_TRAIN = Path("metrics") / "train.json"
METRICS_EVAL = Path("metrics") / "eval.json"
TIMING_TRAIN = Path("logs") / "train_timing.json"
HISTORY_CSV = Path("plots") / "train" / "history.csv"
CURVES_PNG = Path("plots") / "train" / "curves.png"
AUGMENTED_PNG = Path("plots") / "train" / "augmented.png"
PER_CLASS_CSV = Path("plots") / "eval" / "per_class.csv"
MISCLASSIFIED_PNG = Path("plots") / "eval" / "misclassified.png"
CONFUSION_CSV = Path("plots") / "eval" / "confusion.csv"
CONFUSION_PNG = Path("plots") / "eval" / "confusion.png"
