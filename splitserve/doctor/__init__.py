"""`splitserve doctor`: name what is wrong with a deployment, from its logs (logs.py,
signatures.py) or by asking the running processes, with the fix for each (report.py)."""
