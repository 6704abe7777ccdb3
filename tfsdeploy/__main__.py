from tfsdeploy.cli import main

main()
