from par_deploy.cli import main

main()
