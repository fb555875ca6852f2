"""Reader for the Grocery Store Dataset layout (classes.csv, train/val lists, iconic images).

Catalog view = one iconic image per product (SKU = class name); the "seller shows it" view =
hand-held photos under train/ and val/.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GroceryProduct:
    sku: str  # class name, e.g. "Arla-Standard-Milk"
    class_id: int
    coarse: str  # e.g. "Milk"
    group: str  # top folder: "Fruit", "Vegetables" or "Packages"
    catalog_image: Path

    @property
    def packaged(self) -> bool:
        return self.group == "Packages"


@dataclass(frozen=True)
class GroceryPhoto:
    path: Path
    sku: str


@dataclass(frozen=True)
class GroceryData:
    root: Path
    products: list[GroceryProduct]

    def photos(self, split: str) -> list[GroceryPhoto]:
        """Photos of a split ("train" or "val") whose product has a catalog image."""
        by_id = {p.class_id: p for p in self.products}
        out = []
        with (self.root / f"{split}.txt").open() as f:
            for line in f:
                parts = [x.strip() for x in line.split(",")]
                if len(parts) < 2 or not parts[0]:
                    continue
                product = by_id.get(int(parts[1]))
                if product is not None:
                    out.append(GroceryPhoto(self.root / parts[0], product.sku))
        return out


def read_grocery(root: str | Path) -> GroceryData:
    """Parse classes.csv; raises FileNotFoundError with the path when the layout is wrong."""
    root = Path(root)
    table = root / "classes.csv"
    if not table.is_file():
        raise FileNotFoundError(f"{table} not found: expected the grocery layout (classes.csv, train.txt, val.txt, ...)")
    products = []
    with table.open(newline="") as f:
        rows = csv.reader(f)
        next(rows)  # header
        for row in rows:
            if len(row) < 5:
                continue
            name, class_id, coarse, _, iconic = row[:5]
            rel = iconic.lstrip("/")
            products.append(GroceryProduct(name, int(class_id), coarse, rel.split("/")[1], root / rel))
    return GroceryData(root, products)
