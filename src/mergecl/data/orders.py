"""Fixed class and domain orders of the MagMax paper benchmarks.

Provenance [code]: the released MagMax code (github.com/danielm1405/magmax, ``src/datasets/*.py``)
hard-codes a ``default_class_order`` list per dataset. They are NOT ``np.random.seed(1993);
np.random.permutation(n)`` (the PyCIL convention a secondary summary suggested; we checked, the lists
differ), so they are stored here as data. What the code does with them (``src/datasets/common.py``):
task i of T trains on ``order[floor(n*i/T) : floor(n*(i+1)/T)]``; ``class_incremental`` cuts the
same way.

The ids index classes the way MagMax's loaders number them (torchvision ``ImageFolder``: sorted
folder names, case-sensitive), which our loaders reproduce:
- cifar100: the official fine-label ids (0..99, alphabetical).
- imagenet_r: sorted readable class names from imagenet-r/README.txt (MagMax renames the wnid
  folders to these names before ``ImageFolder``): 'African_chameleon' and 'Granny_Smith' first.
- cub200: classes.txt order (001.Black_footed_Albatross ...); MagMax reuses the ImageNet-R list.
- cars: MagMax has no order for Stanford Cars, so its tasks follow the natural order 0..195.
- domainnet: sorted (case-sensitive) class folder names: 'The_Eiffel_Tower' ... first.

Any other dataset: ``paper_class_order`` falls back to the PyCIL convention, a seeded permutation
(seed 1993 by default), and says so in its docstring; pass ``order=...`` to a scenario to override.
"""

from __future__ import annotations

from mergecl.data.splits import seeded_permutation
from mergecl.errors import MergeclError

_ORDER_200 = [
    186, 157, 67, 59, 117, 1, 122, 14, 131, 40, 66, 199, 92, 170, 197, 118, 173, 37, 146, 191, 4, 198,
    64, 56, 51, 165, 0, 107, 175, 148, 187, 161, 137, 180, 133, 181, 177, 12, 20, 74, 143, 142, 110, 116,
    194, 138, 183, 89, 45, 121, 190, 94, 36, 83, 130, 120, 21, 38, 125, 145, 182, 103, 105, 61, 32, 141,
    13, 112, 111, 104, 26, 69, 39, 156, 147, 108, 72, 10, 96, 188, 16, 63, 152, 86, 160, 119, 184, 7,
    172, 132, 44, 42, 82, 15, 114, 127, 85, 168, 55, 65, 3, 95, 171, 176, 33, 43, 17, 97, 163, 62, 75,
    123, 128, 124, 99, 29, 28, 166, 41, 35, 76, 77, 5, 84, 102, 60, 78, 70, 164, 113, 30, 91, 81, 18,
    155, 179, 73, 46, 80, 31, 150, 79, 174, 153, 50, 144, 9, 167, 134, 135, 101, 49, 106, 154, 23, 100,
    48, 25, 71, 139, 162, 158, 159, 87, 90, 11, 24, 57, 19, 52, 129, 140, 178, 53, 169, 195, 126, 47,
    151, 136, 22, 58, 34, 8, 185, 54, 109, 193, 68, 192, 149, 115, 98, 88, 93, 6, 196, 189, 2, 27,
]  # fmt: skip

PAPER_CLASS_ORDERS: dict[str, list[int]] = {
    "cifar100": [
        70, 89, 11, 13, 63, 53, 86, 57, 41, 43, 14, 98, 52, 73, 95, 96, 33, 16, 39, 74, 25, 88, 35, 28,
        79, 82, 72, 4, 30, 17, 59, 97, 36, 38, 29, 55, 83, 7, 22, 48, 19, 47, 2, 44, 67, 71, 34, 84, 6,
        46, 61, 8, 80, 10, 49, 15, 68, 9, 99, 40, 27, 45, 51, 37, 21, 64, 92, 24, 60, 31, 5, 91, 93, 90,
        65, 66, 77, 20, 58, 62, 23, 76, 75, 42, 0, 26, 87, 50, 3, 56, 81, 1, 94, 69, 18, 78, 54, 12, 85, 32,
    ],
    "imagenet_r": _ORDER_200,
    "cub200": _ORDER_200,
    "cars": list(range(196)),
    "domainnet": [
        76, 44, 168, 324, 291, 274, 118, 223, 113, 269, 279, 105, 6, 30, 248, 56, 230, 101, 148, 143, 307,
        33, 325, 19, 221, 71, 161, 130, 200, 306, 94, 195, 224, 320, 340, 253, 37, 158, 189, 201, 97, 150,
        18, 159, 311, 334, 266, 321, 284, 203, 182, 67, 214, 136, 267, 296, 4, 41, 226, 11, 283, 126, 210,
        193, 132, 167, 72, 16, 63, 7, 241, 251, 282, 254, 149, 218, 204, 28, 302, 222, 103, 231, 96, 106,
        146, 121, 270, 119, 74, 145, 120, 38, 252, 114, 256, 140, 225, 22, 124, 185, 322, 215, 264, 42, 23,
        292, 265, 174, 313, 129, 285, 69, 43, 34, 301, 219, 257, 21, 229, 48, 234, 309, 66, 310, 24, 202,
        261, 68, 271, 176, 316, 186, 196, 315, 319, 134, 54, 60, 70, 288, 194, 245, 268, 147, 337, 281,
        326, 235, 47, 187, 243, 213, 181, 255, 212, 92, 77, 294, 17, 49, 331, 144, 197, 190, 155, 117, 323,
        53, 50, 341, 191, 178, 308, 100, 61, 237, 83, 0, 1, 14, 205, 238, 40, 81, 183, 220, 112, 98, 135,
        31, 35, 276, 172, 258, 125, 286, 295, 343, 25, 184, 65, 32, 26, 151, 84, 206, 10, 39, 318, 91, 13,
        87, 99, 277, 240, 62, 156, 262, 188, 211, 166, 317, 247, 328, 289, 217, 169, 232, 330, 246, 173,
        46, 51, 244, 228, 208, 64, 152, 249, 179, 198, 55, 20, 15, 128, 154, 303, 116, 171, 278, 59, 73,
        45, 180, 177, 314, 110, 312, 141, 36, 27, 163, 175, 339, 95, 78, 259, 162, 142, 272, 57, 233, 260,
        2, 137, 209, 102, 300, 216, 304, 3, 227, 89, 104, 52, 263, 239, 90, 93, 170, 133, 80, 336, 297, 8,
        250, 79, 82, 108, 138, 280, 88, 192, 333, 344, 275, 298, 327, 157, 9, 85, 287, 335, 127, 111, 290,
        299, 29, 242, 329, 293, 199, 236, 58, 75, 86, 5, 165, 273, 107, 153, 123, 332, 305, 160, 207, 139,
        338, 122, 342, 131, 164, 12, 115, 109,
    ],
}  # fmt: skip

# Domain-incremental sequences [code]: MagMax's ``default_domain_order`` applied to its DOMAINS lists.
PAPER_DOMAIN_ORDERS: dict[str, list[str]] = {
    "imagenet_r": [
        "tattoo", "sketch", "graphic", "painting", "art", "origami", "graffiti", "sticker", "cartoon",
        "misc", "toy", "embroidery", "videogame", "sculpture", "deviantart",
    ],
    "domainnet": ["clipart", "sketch", "real", "infograph", "quickdraw", "painting"],
}  # fmt: skip

PYCIL_SEED = 1993


def paper_class_order(dataset_name: str, num_classes: int, seed: int = PYCIL_SEED) -> list[int]:
    """The fixed class order of ``dataset_name``: MagMax's released list, else a seeded permutation.

    For the five MagMax datasets (cifar100, imagenet_r, cub200, cars, domainnet) this is the list
    from the authors' code. For any other name it is ``np.random.seed(seed);
    np.random.permutation(num_classes)`` with seed 1993, the PyCIL convention ([2nd]: configurable
    through ``seed``).
    """
    order = PAPER_CLASS_ORDERS.get(dataset_name)
    if order is None:
        return seeded_permutation(num_classes, seed)
    if len(order) != num_classes:
        raise MergeclError(
            f"the paper class order of {dataset_name} has {len(order)} classes but the data has "
            f"{num_classes}: the class folders differ from the official release"
        )
    return list(order)
