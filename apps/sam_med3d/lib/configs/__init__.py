"""The app's TaskConfig, its --conf options and the choice of served weights."""
