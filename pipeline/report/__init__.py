"""The reporting layer: report.json, budgets, Markdown, HTML, the JSON schema, gate, re-render, PNG render.

It reads JSON that the stages wrote and never imports torch or pipeline.train, so `pipeline gate` and
`pipeline report` stay fast and run where no training stack is installed.
"""
