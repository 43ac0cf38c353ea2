"""Models and how they are scored: the ResNet50 trunk and its weights, the custom head of
the paper's Table II (one builder), the ResNet50 trained on the cells (`trained`), the
sweep's classifiers and metrics (one scorer), and the model bundle. No Ray.

May import: torch, torchvision, scikit-learn, `leukray.config`, `leukray.errors`, `leukray.io`,
`leukray.data.splits`.
"""
