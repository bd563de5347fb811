"""The dashboard service mounted on the api-server: the app, its auth, the store, the Redis client."""
