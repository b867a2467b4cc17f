from mergedistill.cli import entry

entry()
