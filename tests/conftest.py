pytest_plugins = ["kubemcsa.testing.pytest_plugin"]
