"""What each data set is: classes, input size, and the paper's training defaults.

Pure data, no I/O: the config loader, the model zoo and the CLI read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")
FERPLUS_NAMES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                 "contempt")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    class_names: tuple[str, ...]
    image_size: int
    channels: int
    # Victim (teacher) training defaults from the paper (its Table 2), or sized for CPUs.
    victim_training: dict = field(default_factory=dict)
    victim_architecture: str = "alexnet"
    student_architecture: str = "half_alexnet"
    horizontal_flip: bool = True  # never for digits: a flipped 2 is not a 2

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


_DIGITS_VICTIM = dict(optimizer="adam", lr=1e-3, step_size=5, gamma=0.7, max_epochs=8,
                      patience=8, batch_size=64, early_stopping="none")

SPECS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", DIGIT_NAMES, 28, 1, _DIGITS_VICTIM, "digits_cnn",
                          "digits_cnn_small", horizontal_flip=False),
    "digits-xdomain": DatasetSpec("digits-xdomain", DIGIT_NAMES, 28, 1, _DIGITS_VICTIM,
                                  "digits_cnn", "digits_cnn_small", horizontal_flip=False),
    # Held out from choosing defaults: victim on scikit-learn's digits, generator on MNIST.
    "sklearn-digits": DatasetSpec("sklearn-digits", DIGIT_NAMES, 28, 1, _DIGITS_VICTIM,
                                  "digits_cnn", "digits_cnn_small", horizontal_flip=False),
    "cifar10": DatasetSpec("cifar10", CIFAR10_NAMES, 32, 3,
                           dict(optimizer="adam", lr=5e-4, step_size=5, gamma=0.95,
                                max_epochs=100, batch_size=64)),
    # Food-101 class names come from the data set files; the count is fixed.
    "food101": DatasetSpec("food101", tuple(f"food_{i}" for i in range(101)), 224, 3,
                           dict(optimizer="adam", lr=1e-3, step_size=20, gamma=0.95,
                                max_epochs=100, batch_size=64)),
    "ferplus": DatasetSpec("ferplus", FERPLUS_NAMES, 224, 3,
                           dict(optimizer="adam", lr=5e-4, step_size=10, gamma=0.55,
                                max_epochs=30, batch_size=32), "vit_b", "fastvit",
                           horizontal_flip=True),
    "imagefolder": DatasetSpec("imagefolder", (), 224, 3,
                               dict(optimizer="adam", lr=1e-3, step_size=20, gamma=0.95,
                                    max_epochs=100, batch_size=64)),
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; expected one of: "
                         f"{', '.join(SPECS)}.") from None
