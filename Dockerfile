# runbox-mta in a container: non-root, configuration and certificates mounted
# at /etc/runbox-mta, state in the /var/lib/runbox-mta volume.
#   docker build -t runbox-mta .
#   docker run --rm -v runbox-state:/var/lib/runbox-mta -v /etc/runbox-mta:/etc/runbox-mta:ro runbox-mta db upgrade
#   docker run -d -p 25:25 -p 465:465 -p 587:587 -p 993:993 -p 143:143 -p 995:995 -p 110:110 \
#       -v runbox-state:/var/lib/runbox-mta -v /etc/runbox-mta:/etc/runbox-mta:ro runbox-mta
# Docker lets unprivileged processes bind low ports inside the container
# (net.ipv4.ip_unprivileged_port_start=0), so no capability is needed.
FROM python:3.11-slim

RUN useradd --system --user-group --home-dir /var/lib/runbox-mta --create-home runbox-mta

WORKDIR /opt/runbox-mta
COPY pyproject.toml README.md ./
COPY runbox_mta ./runbox_mta
RUN pip install --no-cache-dir . && rm -rf /root/.cache

USER runbox-mta
ENV RUNBOX_MTA_CONFIG=/etc/runbox-mta/runbox-mta.toml
VOLUME ["/var/lib/runbox-mta"]
EXPOSE 25 110 143 465 587 993 995
STOPSIGNAL SIGTERM
ENTRYPOINT ["runbox-mta"]
CMD ["serve"]
