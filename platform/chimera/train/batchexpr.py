"""Safe integer arithmetic for `--total_batch_size_str` ("2**13", "8*1024", "(4+4)*2**10").

    from chimera.train.batchexpr import parse_batch_expr
    parse_batch_expr("2**13")      # 8192

Only integer literals, + - * // ** (binary), unary + -, and parentheses are accepted; the text
is parsed with `ast` and walked node by node, never passed to eval. The result must be a
positive integer; huge powers are refused before they are computed.
"""
from __future__ import annotations

import ast
import operator

MAX_VALUE = 2 ** 62          # far beyond any batch size, small enough to keep ** harmless

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class BatchExprError(ValueError):
    """The expression is not integer arithmetic, or its value is not a usable batch size."""


def parse_batch_expr(text: str | int) -> int:
    """Value of an integer arithmetic expression; BatchExprError for anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        if not isinstance(text, str) or not text.strip():
            raise BatchExprError(f"total_batch_size_str={text!r}: expected an integer expression "
                                 f"such as '2**13' or '8*1024'")
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError:
            raise BatchExprError(f"total_batch_size_str={text!r}: not a valid expression; use "
                                 f"integers, + - * // ** and parentheses") from None
        value = _eval(tree.body, text)
    if value < 1:
        raise BatchExprError(f"total_batch_size_str={text!r} = {value}: must be a positive integer")
    return value


def _eval(node: ast.AST, text: str) -> int:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        raise BatchExprError(f"total_batch_size_str={text!r}: {node.value!r} is not an integer "
                             f"(only integers, + - * // ** and parentheses are allowed)")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval(node.left, text), _eval(node.right, text)
        if isinstance(node.op, ast.Pow):
            if b < 0:
                raise BatchExprError(f"total_batch_size_str={text!r}: negative exponent {b}")
            if a not in (-1, 0, 1) and b * max(abs(a), 2).bit_length() > 64:
                raise BatchExprError(f"total_batch_size_str={text!r}: {a}**{b} is too large")
        if isinstance(node.op, ast.FloorDiv) and b == 0:
            raise BatchExprError(f"total_batch_size_str={text!r}: division by zero")
        value = _BINOPS[type(node.op)](a, b)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
        value = _UNOPS[type(node.op)](_eval(node.operand, text))
    else:
        what = type(getattr(node, "op", node)).__name__
        raise BatchExprError(f"total_batch_size_str={text!r}: {what} is not allowed; use "
                             f"integers, + - * // ** and parentheses only")
    if abs(value) > MAX_VALUE:
        raise BatchExprError(f"total_batch_size_str={text!r}: value is too large")
    return value
