from udp_tunnel.cli import main

raise SystemExit(main())
