"""The `dglocal` command: commands (parse → options → call → render), the shared options (options), the chat
loop (chat), the terminal views (views) and every other rendering (render). The only package that draws on a
terminal; it imports every other one and none imports it."""

from .commands import app

__all__ = ["app"]
