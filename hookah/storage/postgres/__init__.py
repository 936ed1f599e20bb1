"""PostgreSQL storage: several Hookah nodes sharing one database."""
