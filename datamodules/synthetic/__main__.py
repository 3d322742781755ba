from .shards import main

main()
