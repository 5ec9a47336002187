from fedllm.cli import main

main()
