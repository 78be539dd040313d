"""The radix tree as plain data and as text, for the book's explorer and for debugging."""
from __future__ import annotations

from typing import Any

from hybridpar.radix.radix_cache import RadixCache, TreeNode


def tree_to_dict(cache: RadixCache) -> dict[str, Any]:
    """The tree as plain data (for the book's radix-tree explorer).

    Each node: ``id``, ``num_tokens``, ``tokens``, ``lock_ref``, ``last_access_time``,
    ``evict_rank`` (0 = the next leaf :meth:`RadixCache.evict` would free, ``None`` if not
    evictable now) and ``children`` (sorted by first token).
    """
    leaves = sorted(n for n in cache.nodes() if not n.children and n.lock_ref == 0)
    rank = {n.id: i for i, n in enumerate(leaves)}

    def node_dict(node: TreeNode) -> dict[str, Any]:
        return {
            "id": node.id,
            "num_tokens": len(node.key),
            "tokens": list(node.key),
            "lock_ref": node.lock_ref,
            "last_access_time": node.last_access_time,
            "evict_rank": rank.get(node.id),
            "children": [node_dict(c) for c in sorted(node.children.values(), key=lambda c: c.key)],
        }

    return {
        "page_size": cache.page_size,
        "disabled": cache.disable,
        "clock": cache.clock,
        "evictable_size": cache.evictable_size(),
        "protected_size": cache.protected_size(),
        "root": node_dict(cache.root_node),
    }

def pretty_print(cache: RadixCache, max_tokens: int = 8) -> str:
    """Print (and return) an indented outline of the tree."""
    lines: list[str] = []

    def visit(d: dict[str, Any], depth: int) -> None:
        toks = " ".join(map(str, d["tokens"][:max_tokens])) + (" ..." if d["num_tokens"] > max_tokens else "")
        lines.append(f"{'  ' * depth}#{d['id']} [{toks}] n={d['num_tokens']} lock={d['lock_ref']} t={d['last_access_time']}")
        for c in d["children"]:
            visit(c, depth + 1)

    tree = tree_to_dict(cache)
    visit(tree["root"], 0)
    lines.append(f"evictable={tree['evictable_size']} protected={tree['protected_size']}")
    text = "\n".join(lines)
    print(text)
    return text
