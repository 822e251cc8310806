"""The vocabulary every other package speaks: requests, results, errors, protocols.

Imports nothing from the web framework, HTTP clients or databases.
"""
