"""`synthetic_lesions`: procedural lesion images (no download); see generate.py."""
from data_prep.synthetic_lesions.builder import SyntheticLesions  # noqa: F401
from data_prep.synthetic_lesions.generate import generate_example  # noqa: F401
