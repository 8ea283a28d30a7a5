"""grouped_mm on CPU: its inference fast path (`lean`), the reusable buffers it takes (`workspace`), and that path
as one custom op a compiled graph calls (`compiled`). Imports `moelab.core` and the rest of `moelab.backends`."""
