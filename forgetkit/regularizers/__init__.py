"""Regularizers against forgetting: a small Protocol, pure functional cores, thin wrappers."""

from forgetkit.regularizers.base import RegContext, Regularizer

__all__ = ["RegContext", "Regularizer"]
