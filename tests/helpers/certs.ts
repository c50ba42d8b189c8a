/**
 * Certificates made at test time with openssl (Debian's): a CA, and certificates for
 * 127.0.0.1/localhost signed by it, for the gateway's HTTPS and NATS's TLS.
 *
 * @module
 */

async function openssl(args: string[], cwd: string) {
  const out = await new Deno.Command("openssl", { args, cwd, stdout: "null", stderr: "piped" })
    .output();
  if (!out.success) throw new Error(new TextDecoder().decode(out.stderr));
}

/** A CA's files in `dir`: `<name>.pem` and `<name>.key`. */
export interface Ca {
  dir: string;
  name: string;
  pem: string;
  key: string;
}

/** Makes a self-signed CA named `name` in `dir`. */
export async function makeCa(dir: string, name: string): Promise<Ca> {
  await openssl([
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-days",
    "1",
    "-subj",
    `/CN=${name}`,
    "-keyout",
    `${name}.key`,
    "-out",
    `${name}.pem`,
  ], dir);
  return { dir, name, pem: `${dir}/${name}.pem`, key: `${dir}/${name}.key` };
}

/**
 * Makes `<name>.pem` and `<name>.key` in the CA's directory: a certificate for 127.0.0.1
 * and localhost, signed by `ca`, usable by servers and clients (routes use both ends).
 */
export async function makeCert(ca: Ca, name: string): Promise<{ cert: string; key: string }> {
  const { dir } = ca;
  await openssl([
    "req",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-subj",
    "/CN=127.0.0.1",
    "-keyout",
    `${name}.key`,
    "-out",
    `${name}.csr`,
  ], dir);
  await Deno.writeTextFile(
    `${dir}/${name}.ext`,
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
  );
  await openssl([
    "x509",
    "-req",
    "-in",
    `${name}.csr`,
    "-CA",
    ca.pem,
    "-CAkey",
    ca.key,
    "-CAcreateserial",
    "-days",
    "1",
    "-extfile",
    `${name}.ext`,
    "-out",
    `${name}.pem`,
  ], dir);
  return { cert: `${dir}/${name}.pem`, key: `${dir}/${name}.key` };
}
