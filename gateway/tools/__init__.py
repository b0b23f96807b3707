"""Small command-line tools that ship with the gateway (a push watcher for trying it out)."""
