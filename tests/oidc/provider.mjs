// A real OpenID provider for wgmfa's tests: panva's oidc-provider (a certified OP) with
// its development login and consent pages. Any password is accepted; the login name picks
// the account. Configuration comes as JSON in WGMFA_TEST_OP:
//   {"port": 1234, "clients": [{client_id, client_secret, redirect_uris}],
//    "accounts": {"alice": {"email": "...", "email_verified": true}}}
// Prints "ready <issuer>" once it listens.
import Provider from 'oidc-provider';

const config = JSON.parse(process.env.WGMFA_TEST_OP);
const issuer = `http://127.0.0.1:${config.port}`;

const provider = new Provider(issuer, {
  clients: config.clients.map((client) => ({
    client_id: client.client_id,
    client_secret: client.client_secret,
    redirect_uris: client.redirect_uris,
    response_types: ['code'],
    grant_types: ['authorization_code'],
    token_endpoint_auth_method: 'client_secret_basic',
  })),
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name'],
  },
  // fixed keys: the tests are the only users, and the development-keys warning is noise
  cookies: { keys: ['wgmfa-test-provider-cookie-key'] },
  pkce: { required: () => true },
  async findAccount(_ctx, id) {
    const account = config.accounts[id];
    if (!account) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, name: id, email: account.email, email_verified: account.email_verified };
      },
    };
  },
});

// a failure inside the provider shows in its log, next to the test that caused it
provider.on('server_error', (_ctx, error) => console.error('server_error', error));

provider.listen(config.port, '127.0.0.1', () => {
  console.log(`ready ${issuer}`);
});
