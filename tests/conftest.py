pytest_plugins = ("tests.db_fixtures",)
